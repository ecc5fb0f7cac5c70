//! A restricted pickle interpreter for the release's `ckpt-0` tensor files.
//!
//! A pickle is a program for Python's unpickler; here it is only *interpreted symbolically*:
//! nothing is imported or called. The interpreter knows the handful of opcodes the release's
//! files use (protocol 2-5 forms) and exactly five globals:
//!
//! - `numpy.core.multiarray._reconstruct` / `numpy._core.multiarray._reconstruct` with
//!   `numpy.ndarray`: an empty array whose BUILD state `(1, shape, dtype, fortran, bytes)`
//!   gives its contents;
//! - `numpy.dtype` (called with a descriptor string such as `'f4'`, or with the type
//!   `ml_dtypes.bfloat16`), whose BUILD state gives the byte order;
//! - `__main__.QuantizedWeight8bit`, made with NEWOBJ and given `{weight, scales}` by BUILD.
//!
//! Anything else is refused with [`CheckpointError::Pickle`] naming the file and the offset of
//! the opcode. Array payloads are never copied: they become sub-views of the input
//! [`ByteView`] (normally a memory-mapped file). Every size the input controls is bounded and
//! checked against the bytes that remain, so a hostile file cannot make the interpreter
//! allocate much more than its own length, recurse deeply, or panic.

use super::{CheckpointError, DType, RawTensor, Result, StoredTensor};
use crate::bytes::ByteView;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

/// Most values on the stack at once (the release's files need about ten).
pub const MAX_STACK: usize = 1 << 14;
/// Most nested MARKs.
pub const MAX_MARKS: usize = 256;
/// Most memo entries (the release's files use about fifty).
pub const MAX_MEMO: usize = 1 << 14;
/// Deepest tuple nesting (bounds recursion when values are dropped).
pub const MAX_NESTING: u32 = 32;
/// Longest string (module, class and dtype names are short).
pub const MAX_STR: usize = 4096;
/// Most array dimensions (numpy allows 64).
pub const MAX_NDIM: usize = 64;
/// Most entries of a dict (only `QuantizedWeight8bit.__dict__` is expected).
const MAX_DICT: usize = 16;

/// Interprets one tensor pickle. `file` is only used in error messages.
///
/// Returns the plain array or the `QuantizedWeight8bit` it describes, with payloads viewing
/// `bytes`.
pub fn parse(bytes: ByteView, file: &Path) -> Result<StoredTensor> {
    let buf = bytes.as_slice();
    let mut m = Machine {
        view: &bytes,
        buf,
        file,
        pos: 0,
        op_at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    m.run()
}

// ---------------------------------------------------------------------------------------------
// Opcodes (names as in CPython's pickletools).

const MARK: u8 = b'(';
const STOP: u8 = b'.';
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const NONE: u8 = b'N';
const REDUCE: u8 = b'R';
const BINUNICODE: u8 = b'X';
const EMPTY_DICT: u8 = b'}';
const BUILD: u8 = b'b';
const GLOBAL: u8 = b'c';
const BINGET: u8 = b'h';
const LONG_BINGET: u8 = b'j';
const BINPUT: u8 = b'q';
const LONG_BINPUT: u8 = b'r';
const SETITEM: u8 = b's';
const TUPLE: u8 = b't';
const SETITEMS: u8 = b'u';
const EMPTY_TUPLE: u8 = b')';
const PROTO: u8 = 0x80;
const NEWOBJ: u8 = 0x81;
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const LONG1: u8 = 0x8a;
const BINBYTES: u8 = b'B';
const SHORT_BINBYTES: u8 = b'C';
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE8: u8 = 0x8d;
const BINBYTES8: u8 = 0x8e;
const STACK_GLOBAL: u8 = 0x93;
const MEMOIZE: u8 = 0x94;
const FRAME: u8 = 0x95;

/// Names of the opcodes Python knows, for messages about the ones refused here.
fn opcode_name(op: u8) -> Option<&'static str> {
    Some(match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Symbolic values.

/// The only globals a checkpoint pickle may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    Reconstruct,
    Ndarray,
    Dtype,
    Bf16,
    QuantizedWeight8bit,
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct") => {
                Global::Reconstruct
            }
            ("numpy", "ndarray") => Global::Ndarray,
            ("numpy", "dtype") => Global::Dtype,
            ("ml_dtypes", "bfloat16") => Global::Bf16,
            ("__main__", "QuantizedWeight8bit") => Global::QuantizedWeight8bit,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Global::Reconstruct => "numpy.core.multiarray._reconstruct",
            Global::Ndarray => "numpy.ndarray",
            Global::Dtype => "numpy.dtype",
            Global::Bf16 => "ml_dtypes.bfloat16",
            Global::QuantizedWeight8bit => "__main__.QuantizedWeight8bit",
        }
    }
}

/// A `numpy.dtype(...)` object; its byte order comes from its BUILD state.
#[derive(Debug)]
struct DtypeObj {
    dtype: DType,
    /// The descriptor as written, for messages.
    descr: String,
    /// `<` or `|` once known (from a descriptor prefix or the BUILD state).
    order: Option<u8>,
    state_set: bool,
}

/// The result of `_reconstruct(ndarray, ...)`: empty until its BUILD.
#[derive(Debug, Default)]
struct ArrayObj {
    tensor: Option<RawTensor>,
}

type ArrayRef = Rc<RefCell<ArrayObj>>;

/// A `QuantizedWeight8bit`; holds the array objects themselves (Python object identity), so
/// an array built after being attached is seen built at the end, as in Python.
#[derive(Debug, Default)]
struct QwObj {
    weight: Option<ArrayRef>,
    scales: Option<ArrayRef>,
    state_set: bool,
}

/// A dict; only string keys and array values are accepted (all a `QuantizedWeight8bit`'s
/// `__dict__` holds), which also keeps the object graph free of cycles.
#[derive(Debug, Default)]
struct DictObj {
    entries: Vec<(Rc<str>, ArrayRef)>,
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Str(Rc<str>),
    Bytes(ByteView),
    /// Items and nesting depth (1 for a tuple without tuples inside).
    Tuple(Rc<[Value]>, u32),
    Dict(Rc<RefCell<DictObj>>),
    Global(Global),
    Dtype(Rc<RefCell<DtypeObj>>),
    Array(ArrayRef),
    Qw(Rc<RefCell<QwObj>>),
}

impl Value {
    /// What the value is, for messages.
    fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {}", if *b { "True" } else { "False" }),
            Value::Int(i) => format!("int {i}"),
            Value::Str(s) => format!("str '{}'", show(s)),
            Value::Bytes(b) => format!("bytes of length {}", b.len()),
            Value::Tuple(t, _) => format!("tuple of {} items", t.len()),
            Value::Dict(_) => "dict".into(),
            Value::Global(g) => format!("global {}", g.name()),
            Value::Dtype(_) => "numpy.dtype".into(),
            Value::Array(_) => "numpy.ndarray".into(),
            Value::Qw(_) => "QuantizedWeight8bit".into(),
        }
    }

    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(_, d) => *d,
            _ => 0,
        }
    }
}

/// A string for a message: at most 80 characters, escaped.
fn show(s: &str) -> String {
    let mut out: String = s.chars().take(80).flat_map(char::escape_debug).collect();
    if s.chars().nth(80).is_some() {
        out.push_str("...");
    }
    out
}

/// Parses a numpy descriptor (`'f4'`, `'<i1'`, `'bfloat16'`, ...) into our type and the byte
/// order its prefix gives, if any.
fn parse_descr(s: &str) -> std::result::Result<(DType, Option<u8>), String> {
    let (order, code) = match s.as_bytes().first() {
        Some(&c @ (b'<' | b'>' | b'|' | b'=')) => (Some(c), s.get(1..).unwrap_or("")),
        _ => (None, s),
    };
    let dtype = match code {
        "f4" | "float32" => DType::F32,
        "f2" | "float16" => DType::F16,
        "i1" | "int8" => DType::I8,
        "u1" | "uint8" => DType::U8,
        "i4" | "int32" => DType::I32,
        "bfloat16" => DType::BF16,
        other => {
            let known = match other {
                "f8" => " (float64)",
                "i2" => " (int16)",
                "i8" => " (int64)",
                "u2" => " (uint16)",
                "u4" => " (uint32)",
                "u8" => " (uint64)",
                "b1" => " (bool)",
                "c8" => " (complex64)",
                "c16" => " (complex128)",
                "O" | "O8" => " (Python objects)",
                _ => "",
            };
            return Err(format!(
                "unsupported dtype '{}'{known}: checkpoint tensors must be float32, float16, \
                 bfloat16, int8, uint8 or int32",
                show(s)
            ));
        }
    };
    check_order(order, dtype, s)?;
    Ok((dtype, order))
}

/// Accepts little-endian (`<`) and not-applicable (`|`, one-byte types only) byte orders.
fn check_order(order: Option<u8>, dtype: DType, descr: &str) -> std::result::Result<(), String> {
    match order {
        None | Some(b'<') => Ok(()),
        Some(b'|') if dtype.size() == 1 => Ok(()),
        Some(b'>') => Err(format!(
            "big-endian dtype '{}' is not supported",
            show(descr)
        )),
        Some(c) => Err(format!(
            "byte order '{}' is not supported for dtype '{}' (expected '<')",
            (c as char).escape_debug(),
            show(descr)
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// The machine.

struct Machine<'a> {
    view: &'a ByteView,
    buf: &'a [u8],
    file: &'a Path,
    pos: usize,
    /// Offset of the opcode being executed; every error names it.
    op_at: usize,
    stack: Vec<Value>,
    /// Stack lengths at each open MARK; nothing may pop below the last one.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn err(&self, msg: impl Into<String>) -> CheckpointError {
        CheckpointError::Pickle {
            file: self.file.to_path_buf(),
            offset: self.op_at,
            msg: msg.into(),
        }
    }

    // --- reading arguments -------------------------------------------------------------------

    /// Consumes `n` bytes and returns where they start.
    fn take(&mut self, n: usize, what: &str) -> Result<usize> {
        let remaining = self.buf.len().saturating_sub(self.pos);
        if n > remaining {
            return Err(self.err(format!(
                "truncated: {what} needs {n} bytes but only {remaining} remain (file cut short?)"
            )));
        }
        let start = self.pos;
        self.pos = start + n;
        Ok(start)
    }

    fn read(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let start = self.take(n, what)?;
        let buf = self.buf;
        buf.get(start..self.pos)
            .ok_or_else(|| self.err("internal error: read out of bounds"))
    }

    fn read_array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.read(N, what)?;
        s.try_into()
            .map_err(|_| self.err("internal error: short read"))
    }

    fn read_u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.read_array::<1>(what)?[0])
    }

    fn read_u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.read_array(what)?))
    }

    /// A 64-bit length; one that does not fit `usize` can never fit the file either.
    fn read_len8(&mut self, what: &str) -> Result<usize> {
        let n = u64::from_le_bytes(self.read_array(what)?);
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn read_str(&mut self, n: usize, what: &str) -> Result<Value> {
        let start = self.take(n, what)?;
        if n > MAX_STR {
            return Err(self.err(format!(
                "{what}: a string of {n} bytes is longer than any name in a checkpoint \
                 (limit {MAX_STR})"
            )));
        }
        let raw = self
            .buf
            .get(start..self.pos)
            .ok_or_else(|| self.err("internal error: read out of bounds"))?;
        let s = std::str::from_utf8(raw).map_err(|e| self.err(format!("{what}: {e}")))?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn read_bytes(&mut self, n: usize, what: &str) -> Result<Value> {
        let start = self.take(n, what)?;
        // A sub-view of the (mapped) input: payloads are never copied.
        let v = self
            .view
            .slice(start..self.pos)
            .ok_or_else(|| self.err("internal error: read out of bounds"))?;
        Ok(Value::Bytes(v))
    }

    /// A `\n`-terminated line of GLOBAL's text argument.
    fn read_line(&mut self, what: &str) -> Result<&'a str> {
        let buf = self.buf;
        let rest = buf.get(self.pos..).unwrap_or(&[]);
        let window = rest.get(..MAX_STR.min(rest.len())).unwrap_or(&[]);
        let Some(n) = window.iter().position(|&b| b == b'\n') else {
            return Err(self.err(if window.len() < MAX_STR {
                format!("truncated: {what} has no end of line")
            } else {
                format!("{what}: line longer than {MAX_STR} bytes")
            }));
        };
        let line = window.get(..n).unwrap_or(&[]);
        self.take(n + 1, what)?;
        std::str::from_utf8(line).map_err(|e| self.err(format!("{what}: {e}")))
    }

    // --- the stack ---------------------------------------------------------------------------

    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err(format!("stack deeper than {MAX_STACK} values")));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self, what: &str) -> Result<Value> {
        if self.stack.len() <= self.fence() {
            return Err(self.err(format!("stack underflow: {what} needs more values")));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.err(format!("stack underflow: {what} needs more values")))
    }

    fn top(&self, what: &str) -> Result<&Value> {
        if self.stack.len() <= self.fence() {
            return Err(self.err(format!("stack underflow: {what} needs a value")));
        }
        self.stack
            .last()
            .ok_or_else(|| self.err(format!("stack underflow: {what} needs a value")))
    }

    /// Everything above the last MARK, removing the mark.
    fn pop_to_mark(&mut self, what: &str) -> Result<Vec<Value>> {
        let Some(m) = self.marks.pop() else {
            return Err(self.err(format!("{what} without a MARK")));
        };
        if m > self.stack.len() {
            return Err(self.err("internal error: mark above the stack"));
        }
        Ok(self.stack.split_off(m))
    }

    fn tuple(&self, items: Vec<Value>) -> Result<Value> {
        let depth = items.iter().map(Value::depth).max().unwrap_or(0) + 1;
        if depth > MAX_NESTING {
            return Err(self.err(format!("tuples nested deeper than {MAX_NESTING}")));
        }
        Ok(Value::Tuple(items.into(), depth))
    }

    fn memo_put(&mut self, idx: u32) -> Result<()> {
        let v = self.top("storing to the memo")?.clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&idx) {
            return Err(self.err(format!("more than {MAX_MEMO} memo entries")));
        }
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<()> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| self.err(format!("memo entry {idx} was never stored")))?;
        self.push(v)
    }

    // --- the loop ----------------------------------------------------------------------------

    fn run(&mut self) -> Result<StoredTensor> {
        loop {
            self.op_at = self.pos;
            let Some(&op) = self.buf.get(self.pos) else {
                return Err(self.err(if self.buf.is_empty() {
                    "empty file: not a pickle".to_string()
                } else {
                    "truncated: the pickle ends without STOP (file cut short?)".to_string()
                }));
            };
            self.pos += 1;
            match op {
                PROTO => {
                    let v = self.read_u8("PROTO")?;
                    if !(2..=5).contains(&v) {
                        return Err(self.err(format!(
                            "pickle protocol {v} is not supported (expected 2 to 5)"
                        )));
                    }
                }
                FRAME => {
                    // Framing only groups opcodes for buffered reading; check the length
                    // and read on.
                    let n = self.read_len8("FRAME")?;
                    let remaining = self.buf.len().saturating_sub(self.pos);
                    if n > remaining {
                        return Err(self.err(format!(
                            "truncated: FRAME announces {n} bytes but only {remaining} remain \
                             (file cut short?)"
                        )));
                    }
                }
                STOP => return self.finish(),
                MARK => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(self.err(format!("more than {MAX_MARKS} nested MARKs")));
                    }
                    self.marks.push(self.stack.len());
                }
                MEMOIZE => {
                    let idx =
                        u32::try_from(self.memo.len()).map_err(|_| self.err("memo too large"))?;
                    self.memo_put(idx)?;
                }
                BINPUT => {
                    let idx = self.read_u8("BINPUT")?;
                    self.memo_put(u32::from(idx))?;
                }
                LONG_BINPUT => {
                    let idx = self.read_u32("LONG_BINPUT")?;
                    self.memo_put(idx)?;
                }
                BINGET => {
                    let idx = self.read_u8("BINGET")?;
                    self.memo_get(u32::from(idx))?;
                }
                LONG_BINGET => {
                    let idx = self.read_u32("LONG_BINGET")?;
                    self.memo_get(idx)?;
                }
                SHORT_BINUNICODE => {
                    let n = self.read_u8("SHORT_BINUNICODE")?;
                    let v = self.read_str(usize::from(n), "SHORT_BINUNICODE")?;
                    self.push(v)?;
                }
                BINUNICODE => {
                    let n = self.read_u32("BINUNICODE")?;
                    let n = usize::try_from(n).unwrap_or(usize::MAX);
                    let v = self.read_str(n, "BINUNICODE")?;
                    self.push(v)?;
                }
                BINUNICODE8 => {
                    let n = self.read_len8("BINUNICODE8")?;
                    let v = self.read_str(n, "BINUNICODE8")?;
                    self.push(v)?;
                }
                SHORT_BINBYTES => {
                    let n = self.read_u8("SHORT_BINBYTES")?;
                    let v = self.read_bytes(usize::from(n), "SHORT_BINBYTES")?;
                    self.push(v)?;
                }
                BINBYTES => {
                    let n = self.read_u32("BINBYTES")?;
                    let n = usize::try_from(n).unwrap_or(usize::MAX);
                    let v = self.read_bytes(n, "BINBYTES")?;
                    self.push(v)?;
                }
                BINBYTES8 => {
                    let n = self.read_len8("BINBYTES8")?;
                    let v = self.read_bytes(n, "BINBYTES8")?;
                    self.push(v)?;
                }
                BININT1 => {
                    let v = self.read_u8("BININT1")?;
                    self.push(Value::Int(i64::from(v)))?;
                }
                BININT2 => {
                    let v = u16::from_le_bytes(self.read_array("BININT2")?);
                    self.push(Value::Int(i64::from(v)))?;
                }
                BININT => {
                    let v = i32::from_le_bytes(self.read_array("BININT")?);
                    self.push(Value::Int(i64::from(v)))?;
                }
                LONG1 => {
                    let n = usize::from(self.read_u8("LONG1")?);
                    if n > 8 {
                        return Err(self.err(format!(
                            "LONG1 integer of {n} bytes is too large for a checkpoint"
                        )));
                    }
                    let raw = self.read(n, "LONG1")?;
                    // Little-endian two's complement, sign-extended from its top byte.
                    let fill = match raw.last() {
                        Some(&b) if b & 0x80 != 0 => 0xff,
                        _ => 0,
                    };
                    let mut full = [fill; 8];
                    for (d, s) in full.iter_mut().zip(raw) {
                        *d = *s;
                    }
                    self.push(Value::Int(i64::from_le_bytes(full)))?;
                }
                NONE => self.push(Value::None)?,
                NEWTRUE => self.push(Value::Bool(true))?,
                NEWFALSE => self.push(Value::Bool(false))?,
                EMPTY_TUPLE => {
                    let t = self.tuple(Vec::new())?;
                    self.push(t)?;
                }
                TUPLE1 | TUPLE2 | TUPLE3 => {
                    let n = usize::from(op - TUPLE1) + 1;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop("TUPLE")?);
                    }
                    items.reverse();
                    let t = self.tuple(items)?;
                    self.push(t)?;
                }
                TUPLE => {
                    let items = self.pop_to_mark("TUPLE")?;
                    let t = self.tuple(items)?;
                    self.push(t)?;
                }
                EMPTY_DICT => self.push(Value::Dict(Rc::default()))?,
                SETITEM => {
                    let v = self.pop("SETITEM")?;
                    let k = self.pop("SETITEM")?;
                    let d = self.top("SETITEM")?.clone();
                    self.set_items(&d, vec![k, v])?;
                }
                SETITEMS => {
                    let items = self.pop_to_mark("SETITEMS")?;
                    let d = self.top("SETITEMS")?.clone();
                    self.set_items(&d, items)?;
                }
                STACK_GLOBAL => {
                    let name = self.pop("STACK_GLOBAL")?;
                    let module = self.pop("STACK_GLOBAL")?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err(self.err(format!(
                            "STACK_GLOBAL needs two strings, found {} and {}",
                            module.describe(),
                            name.describe()
                        )));
                    };
                    let g = self.global(module, name)?;
                    self.push(Value::Global(g))?;
                }
                GLOBAL => {
                    let module = self.read_line("GLOBAL")?;
                    let name = self.read_line("GLOBAL")?;
                    let g = self.global(module, name)?;
                    self.push(Value::Global(g))?;
                }
                REDUCE => {
                    let args = self.pop("REDUCE")?;
                    let callable = self.pop("REDUCE")?;
                    let v = self.reduce(&callable, &args)?;
                    self.push(v)?;
                }
                NEWOBJ => {
                    let args = self.pop("NEWOBJ")?;
                    let cls = self.pop("NEWOBJ")?;
                    match (&cls, &args) {
                        (Value::Global(Global::QuantizedWeight8bit), Value::Tuple(a, _))
                            if a.is_empty() =>
                        {
                            self.push(Value::Qw(Rc::default()))?
                        }
                        _ => {
                            return Err(self.err(format!(
                                "NEWOBJ may only create __main__.QuantizedWeight8bit() without \
                                 arguments, not {}(*{})",
                                cls.describe(),
                                args.describe()
                            )))
                        }
                    }
                }
                BUILD => {
                    let state = self.pop("BUILD")?;
                    let obj = self.top("BUILD")?.clone();
                    self.build(&obj, &state)?;
                }
                other => {
                    return Err(self.err(match opcode_name(other) {
                        Some(name) => format!(
                            "opcode {name} (0x{other:02x}) is not allowed in a checkpoint tensor \
                             file"
                        ),
                        None => format!("unknown opcode 0x{other:02x}"),
                    }))
                }
            }
        }
    }

    fn global(&self, module: &str, name: &str) -> Result<Global> {
        Global::resolve(module, name).ok_or_else(|| {
            self.err(format!(
                "refusing global '{}.{}': a checkpoint tensor may only name numpy's \
                 _reconstruct, numpy.ndarray, numpy.dtype, ml_dtypes.bfloat16 and \
                 __main__.QuantizedWeight8bit",
                show(module),
                show(name)
            ))
        })
    }

    fn set_items(&self, dict: &Value, items: Vec<Value>) -> Result<()> {
        let Value::Dict(d) = dict else {
            return Err(self.err(format!("SETITEM(S) on a {}, not a dict", dict.describe())));
        };
        let pairs = items.chunks_exact(2);
        if !pairs.remainder().is_empty() {
            return Err(self.err("SETITEMS with an odd number of items"));
        }
        let mut d = d
            .try_borrow_mut()
            .map_err(|_| self.err("internal error: dict in use"))?;
        for pair in pairs {
            let [Value::Str(k), Value::Array(v)] = pair else {
                let desc: Vec<String> = pair.iter().map(Value::describe).collect();
                return Err(self.err(format!(
                    "only str -> numpy.ndarray dict entries are accepted, found {}",
                    desc.join(" -> ")
                )));
            };
            if let Some(e) = d.entries.iter_mut().find(|(ek, _)| ek == k) {
                e.1 = v.clone();
            } else if d.entries.len() >= MAX_DICT {
                return Err(self.err(format!("dict with more than {MAX_DICT} entries")));
            } else {
                d.entries.push((k.clone(), v.clone()));
            }
        }
        Ok(())
    }

    fn reduce(&self, callable: &Value, args: &Value) -> Result<Value> {
        let items: &[Value] = match args {
            Value::Tuple(t, _) => t,
            _ => &[],
        };
        match callable {
            Value::Global(Global::Reconstruct) => match items {
                // `_reconstruct(ndarray, (0,), b'b')`: an empty array awaiting BUILD.
                [Value::Global(Global::Ndarray), Value::Tuple(..), Value::Bytes(_)] => {
                    Ok(Value::Array(Rc::default()))
                }
                _ => Err(self.err(format!(
                    "_reconstruct must be called as (numpy.ndarray, shape, bytes), not with {}",
                    args_desc(args)
                ))),
            },
            Value::Global(Global::Dtype) => {
                let (dtype, order, descr) = match items {
                    [Value::Str(s), Value::Bool(_) | Value::Int(_), Value::Bool(_) | Value::Int(_)] =>
                    {
                        let (dt, order) = parse_descr(s).map_err(|m| self.err(m))?;
                        (dt, order, s.to_string())
                    }
                    // ml_dtypes' bfloat16 is pickled as its type object.
                    [Value::Global(Global::Bf16), Value::Bool(_) | Value::Int(_), Value::Bool(_) | Value::Int(_)] => {
                        (DType::BF16, None, "bfloat16".to_string())
                    }
                    _ => {
                        return Err(self.err(format!(
                            "numpy.dtype must be called as (descriptor, align, copy), not with {}",
                            args_desc(args)
                        )))
                    }
                };
                Ok(Value::Dtype(Rc::new(RefCell::new(DtypeObj {
                    dtype,
                    descr,
                    order,
                    state_set: false,
                }))))
            }
            other => Err(self.err(format!(
                "REDUCE may only call numpy's _reconstruct or numpy.dtype, not {}",
                other.describe()
            ))),
        }
    }

    fn build(&self, obj: &Value, state: &Value) -> Result<()> {
        match obj {
            Value::Dtype(d) => self.build_dtype(d, state),
            Value::Array(a) => self.build_array(a, state),
            Value::Qw(q) => self.build_qw(q, state),
            other => Err(self.err(format!("BUILD on a {}", other.describe()))),
        }
    }

    /// numpy's dtype state: `(3, byteorder, subarray, names, fields, elsize, alignment,
    /// flags[, metadata])`.
    fn build_dtype(&self, d: &Rc<RefCell<DtypeObj>>, state: &Value) -> Result<()> {
        let mut d = d
            .try_borrow_mut()
            .map_err(|_| self.err("internal error: dtype in use"))?;
        if d.state_set {
            return Err(self.err("dtype state set twice"));
        }
        let Value::Tuple(t, _) = state else {
            return Err(self.err(format!(
                "dtype state must be a tuple, not {}",
                state.describe()
            )));
        };
        let (order, elsize) = match &t[..] {
            [Value::Int(3 | 4), Value::Str(order), sub, names, fields, Value::Int(elsize), Value::Int(_), Value::Int(_), rest @ ..]
                if rest.len() <= 1 =>
            {
                if !matches!(
                    (sub, names, fields),
                    (Value::None, Value::None, Value::None)
                ) {
                    return Err(self.err(format!(
                        "dtype '{}': structured and sub-array dtypes are not supported",
                        show(&d.descr)
                    )));
                }
                if !matches!(rest.first(), None | Some(Value::None | Value::Dict(_))) {
                    return Err(self.err("dtype metadata must be None or a dict"));
                }
                (order.clone(), *elsize)
            }
            _ => {
                return Err(self.err(format!(
                    "dtype '{}': unrecognised state {}",
                    show(&d.descr),
                    state.describe()
                )))
            }
        };
        let o = match order.as_bytes() {
            [c] => *c,
            _ => {
                return Err(self.err(format!(
                    "dtype '{}': byte order '{}' is not one character",
                    show(&d.descr),
                    show(&order)
                )))
            }
        };
        check_order(Some(o), d.dtype, &format!("{}{}", (o as char), d.descr))
            .map_err(|m| self.err(m))?;
        // -1 for numpy's own types; extension types (bfloat16) give their size.
        if elsize != -1 && usize::try_from(elsize).ok() != Some(d.dtype.size()) {
            return Err(self.err(format!(
                "dtype '{}' claims {elsize}-byte elements, but {} has {}",
                show(&d.descr),
                d.dtype,
                d.dtype.size()
            )));
        }
        d.order = Some(o);
        d.state_set = true;
        Ok(())
    }

    /// numpy's array state: `(1, shape, dtype, is_fortran, data)` (or without the version).
    fn build_array(&self, a: &ArrayRef, state: &Value) -> Result<()> {
        let Value::Tuple(t, _) = state else {
            return Err(self.err(format!(
                "array state must be a tuple, not {}",
                state.describe()
            )));
        };
        let (shape, dtype, fortran, data) = match &t[..] {
            [Value::Int(1), shape, dtype, fortran, data] | [shape, dtype, fortran, data] => {
                (shape, dtype, fortran, data)
            }
            _ => {
                return Err(self.err(format!(
                    "array state must be (1, shape, dtype, is_fortran, data), not a {}",
                    state.describe()
                )))
            }
        };
        let Value::Tuple(dims, _) = shape else {
            return Err(self.err(format!(
                "array shape must be a tuple, not {}",
                shape.describe()
            )));
        };
        if dims.len() > MAX_NDIM {
            return Err(self.err(format!("array with {} dimensions", dims.len())));
        }
        let mut shape = Vec::with_capacity(dims.len());
        for d in dims.iter() {
            match d {
                Value::Int(i) => shape.push(
                    usize::try_from(*i)
                        .map_err(|_| self.err(format!("array dimension {i} is negative")))?,
                ),
                other => {
                    return Err(self.err(format!(
                        "array dimension must be an int, not {}",
                        other.describe()
                    )))
                }
            }
        }
        let Value::Dtype(dt) = dtype else {
            return Err(self.err(format!(
                "array dtype must be a numpy.dtype, not {}",
                dtype.describe()
            )));
        };
        let (dtype, order, descr) = {
            let dt = dt
                .try_borrow()
                .map_err(|_| self.err("internal error: dtype in use"))?;
            (dt.dtype, dt.order, dt.descr.clone())
        };
        // A multi-byte dtype whose state never came has no byte order we could trust.
        if order.is_none() && dtype.size() > 1 {
            return Err(self.err(format!(
                "dtype '{}' has no byte order (its state was never set)",
                show(&descr)
            )));
        }
        match fortran {
            Value::Bool(false) | Value::Int(0) => {}
            Value::Bool(true) | Value::Int(1) => {
                return Err(self.err(format!(
                    "Fortran-order (column-major) array of shape {shape:?} is not supported"
                )))
            }
            other => {
                return Err(self.err(format!(
                    "array is_fortran flag must be a bool, not {}",
                    other.describe()
                )))
            }
        }
        let Value::Bytes(data) = data else {
            return Err(self.err(format!(
                "array data must be bytes, not {} (object arrays are not supported)",
                data.describe()
            )));
        };
        let tensor = RawTensor::new(dtype, shape, data.clone()).map_err(|m| self.err(m))?;
        let mut a = a
            .try_borrow_mut()
            .map_err(|_| self.err("internal error: array in use"))?;
        if a.tensor.is_some() {
            return Err(self.err("array state set twice"));
        }
        a.tensor = Some(tensor);
        Ok(())
    }

    /// `QuantizedWeight8bit.__dict__.update(state)`: `{'weight': array, 'scales': array}`.
    fn build_qw(&self, q: &Rc<RefCell<QwObj>>, state: &Value) -> Result<()> {
        let Value::Dict(d) = state else {
            return Err(self.err(format!(
                "QuantizedWeight8bit state must be a dict, not {}",
                state.describe()
            )));
        };
        let d = d
            .try_borrow()
            .map_err(|_| self.err("internal error: dict in use"))?;
        let mut q = q
            .try_borrow_mut()
            .map_err(|_| self.err("internal error: object in use"))?;
        if q.state_set {
            return Err(self.err("QuantizedWeight8bit state set twice"));
        }
        for (k, v) in &d.entries {
            match &**k {
                "weight" => q.weight = Some(v.clone()),
                "scales" => q.scales = Some(v.clone()),
                other => {
                    return Err(self.err(format!(
                        "QuantizedWeight8bit has no field '{}' (expected weight and scales)",
                        show(other)
                    )))
                }
            }
        }
        q.state_set = true;
        Ok(())
    }

    fn finish(&mut self) -> Result<StoredTensor> {
        let trailing = self.buf.len().saturating_sub(self.pos);
        if trailing != 0 {
            return Err(self.err(format!("{trailing} bytes after STOP")));
        }
        if !self.marks.is_empty() {
            return Err(self.err("STOP with a MARK still open"));
        }
        if self.stack.len() != 1 {
            return Err(self.err(format!(
                "STOP with {} values on the stack (expected one)",
                self.stack.len()
            )));
        }
        let v = self.pop("STOP")?;
        match &v {
            Value::Array(a) => Ok(StoredTensor::Plain(self.built(a, "the array")?)),
            Value::Qw(q) => {
                let q = q
                    .try_borrow()
                    .map_err(|_| self.err("internal error: object in use"))?;
                let (Some(w), Some(s)) = (&q.weight, &q.scales) else {
                    return Err(
                        self.err("QuantizedWeight8bit without both weight and scales".to_string())
                    );
                };
                Ok(StoredTensor::Quantized {
                    weight: self.built(w, "QuantizedWeight8bit.weight")?,
                    scales: self.built(s, "QuantizedWeight8bit.scales")?,
                })
            }
            other => Err(self.err(format!(
                "the pickle holds a {}, not a numpy array or QuantizedWeight8bit",
                other.describe()
            ))),
        }
    }

    fn built(&self, a: &ArrayRef, what: &str) -> Result<RawTensor> {
        let a = a
            .try_borrow()
            .map_err(|_| self.err("internal error: array in use"))?;
        a.tensor
            .clone()
            .ok_or_else(|| self.err(format!("{what} never received its contents (no BUILD)")))
    }
}

fn args_desc(args: &Value) -> String {
    match args {
        Value::Tuple(t, _) => {
            let parts: Vec<String> = t.iter().take(8).map(Value::describe).collect();
            format!("({})", parts.join(", "))
        }
        other => other.describe(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture_path(i: usize) -> PathBuf {
        crate::test_support::tiny_a_dir()
            .join("ckpt-0")
            .join(super::super::ckpt0::file_name(i))
    }

    fn fixture_bytes(i: usize) -> Vec<u8> {
        std::fs::read(fixture_path(i)).unwrap()
    }

    fn name() -> PathBuf {
        PathBuf::from("/some/dir/tensor00042_000")
    }

    fn run(bytes: &[u8]) -> Result<StoredTensor> {
        parse(ByteView::from_vec(bytes.to_vec()), &name())
    }

    /// Asserts a refusal naming the file, whose message contains `needle`; returns the offset.
    #[track_caller]
    fn refused(bytes: &[u8], needle: &str) -> usize {
        match run(bytes) {
            Err(e @ CheckpointError::Pickle { .. }) => {
                let text = e.to_string();
                assert!(text.contains("tensor00042_000"), "{text}");
                assert!(text.contains(needle), "expected '{needle}' in: {text}");
                let CheckpointError::Pickle { offset, file, .. } = e else {
                    unreachable!()
                };
                assert_eq!(file, name());
                offset
            }
            Err(e) => panic!("wrong error kind: {e}"),
            Ok(t) => panic!("accepted: {t:?}"),
        }
    }

    // --- a tiny pickle writer for crafted inputs -----------------------------------------

    fn s(out: &mut Vec<u8>, s: &str) {
        out.push(SHORT_BINUNICODE);
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }

    fn global(out: &mut Vec<u8>, module: &str, name: &str) {
        s(out, module);
        s(out, name);
        out.push(STACK_GLOBAL);
    }

    fn int(out: &mut Vec<u8>, v: i32) {
        out.push(BININT);
        out.extend_from_slice(&v.to_le_bytes());
    }

    /// numpy's pickling of an array, as in the fixtures; `descr` None means bfloat16.
    fn array(
        out: &mut Vec<u8>,
        module: &str,
        descr: Option<&str>,
        order: &str,
        shape: &[i32],
        fortran: bool,
        payload: &[u8],
    ) {
        global(out, module, "_reconstruct");
        global(out, "numpy", "ndarray");
        int(out, 0);
        out.extend_from_slice(&[TUPLE1, SHORT_BINBYTES, 1, b'b', TUPLE3, REDUCE]);
        out.push(MARK);
        int(out, 1);
        out.push(MARK);
        for &d in shape {
            int(out, d);
        }
        out.push(TUPLE);
        global(out, "numpy", "dtype");
        match descr {
            Some(d) => s(out, d),
            None => global(out, "ml_dtypes", "bfloat16"),
        }
        out.extend_from_slice(&[NEWFALSE, NEWTRUE, TUPLE3, REDUCE, MARK]);
        int(out, 3);
        s(out, order);
        out.extend_from_slice(b"NNN");
        int(out, -1);
        int(out, -1);
        int(out, 0);
        out.extend_from_slice(&[TUPLE, BUILD, if fortran { NEWTRUE } else { NEWFALSE }]);
        out.push(BINBYTES);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
        out.extend_from_slice(&[TUPLE, BUILD]);
    }

    fn array_pickle(descr: &str, order: &str, shape: &[i32], payload: &[u8]) -> Vec<u8> {
        let mut o = vec![PROTO, 4];
        let m = "numpy.core.multiarray";
        array(&mut o, m, Some(descr), order, shape, false, payload);
        o.push(STOP);
        o
    }

    fn plain(r: Result<StoredTensor>) -> RawTensor {
        match r {
            Ok(StoredTensor::Plain(t)) => t,
            other => panic!("{other:?}"),
        }
    }

    // --- the fixtures ----------------------------------------------------------------------

    #[rustfmt::skip]
    /// (file, dtype, payload offset, payload bytes, sum, first, last), computed with
    /// python3 `pickletools` + `struct` (independently of this interpreter).
    const FIXTURE_ARRAYS: &[(usize, DType, usize, usize, f64, f64, f64)] = &[
        (0, DType::F32, 149, 1048576, -78.39834103962804, -0.07819084823131561, -0.13543647527694702),
        (1, DType::F32, 146, 1024, 258.3633971810341, 0.9494209289550781, 1.1940760612487793),
        (2, DType::I8, 201, 704512, 12756.0, 29.0, 18.0),
        (2, DType::BF16, 704819, 5504, 4.1301422119140625, 0.00171661376953125, 0.0013885498046875),
        (3, DType::I8, 201, 704512, 76952.0, 45.0, -50.0),
        (3, DType::BF16, 704819, 32768, 17.061878204345703, 0.00103759765625, 0.0010986328125),
        (4, DType::I8, 201, 704512, 40275.0, 10.0, 29.0),
        (4, DType::BF16, 704819, 5504, 4.1351776123046875, 0.00177764892578125, 0.00133514404296875),
        (5, DType::I8, 198, 32768, 10005.0, 0.0, -24.0),
        (5, DType::BF16, 33060, 256, 0.19216156005859375, 0.0016021728515625, 0.00147247314453125),
        (6, DType::I8, 199, 65536, -19526.0, -32.0, -64.0),
        (6, DType::BF16, 65839, 4096, 2.3516311645507812, 0.0008087158203125, 0.00107574462890625),
        (7, DType::I8, 199, 65536, 6489.0, 88.0, 11.0),
        (7, DType::BF16, 65839, 512, 0.3902740478515625, 0.00128936767578125, 0.0013885498046875),
        (8, DType::I8, 198, 32768, 14837.0, 70.0, 22.0),
        (8, DType::BF16, 33060, 256, 0.1952362060546875, 0.00148773193359375, 0.001617431640625),
        (9, DType::F32, 146, 1024, 254.84791254997253, 0.9997495412826538, 1.035649061203003),
        (10, DType::F32, 146, 1024, 256.63146048784256, 1.0390682220458984, 0.8457369208335876),
        (11, DType::F32, 146, 1024, 256.5569559931755, 1.0675897598266602, 0.9240244030952454),
        (12, DType::F32, 146, 1024, 255.59038197994232, 0.9195385575294495, 1.12710702419281),
        (13, DType::F32, 148, 8192, -2.4426631773239933, 0.35573285818099976, 0.05238204076886177),
        (14, DType::I8, 201, 704512, 31167.0, 35.0, -23.0),
        (14, DType::BF16, 704819, 5504, 4.13543701171875, 0.00144195556640625, 0.001251220703125),
        (15, DType::I8, 201, 704512, 61954.0, 60.0, -17.0),
        (15, DType::BF16, 704819, 32768, 17.090665817260742, 0.001007080078125, 0.00092315673828125),
        (16, DType::I8, 201, 704512, 10542.0, -102.0, -93.0),
        (16, DType::BF16, 704819, 5504, 4.123695373535156, 0.00154876708984375, 0.00162506103515625),
        (17, DType::I8, 198, 32768, 3772.0, -5.0, -36.0),
        (17, DType::BF16, 33060, 256, 0.19167327880859375, 0.0012664794921875, 0.0013580322265625),
        (18, DType::I8, 199, 65536, 903.0, -85.0, 23.0),
        (18, DType::BF16, 65839, 4096, 2.3660621643066406, 0.0012969970703125, 0.0010986328125),
        (19, DType::I8, 199, 65536, -3832.0, 50.0, 62.0),
        (19, DType::BF16, 65839, 512, 0.386505126953125, 0.00148773193359375, 0.001373291015625),
        (20, DType::I8, 198, 32768, -8368.0, -56.0, 6.0),
        (20, DType::BF16, 33060, 256, 0.19189453125, 0.0013580322265625, 0.001434326171875),
        (21, DType::F32, 146, 1024, 257.29633128643036, 0.9970746040344238, 0.9438865184783936),
        (22, DType::F32, 146, 1024, 256.32252556085587, 1.0211894512176514, 0.9687719941139221),
        (23, DType::F32, 146, 1024, 256.1793825030327, 1.0468121767044067, 1.111580729484558),
        (24, DType::F32, 146, 1024, 253.91056901216507, 0.8497315645217896, 1.106926441192627),
        (25, DType::F32, 148, 8192, -12.71194301781361, -0.4694690406322479, -0.1271974891424179),
        (26, DType::I8, 201, 704512, -2332.0, -17.0, -60.0),
        (26, DType::BF16, 704819, 5504, 4.1297607421875, 0.001495361328125, 0.00146484375),
        (27, DType::I8, 201, 704512, -10740.0, 92.0, -52.0),
        (27, DType::BF16, 704819, 32768, 17.037940979003906, 0.000774383544921875, 0.00115203857421875),
        (28, DType::I8, 201, 704512, 26369.0, 18.0, -53.0),
        (28, DType::BF16, 704819, 5504, 4.128883361816406, 0.001220703125, 0.00146484375),
        (29, DType::I8, 198, 32768, -1396.0, -59.0, 32.0),
        (29, DType::BF16, 33060, 256, 0.19409942626953125, 0.00185394287109375, 0.00151824951171875),
        (30, DType::I8, 199, 65536, -4220.0, -34.0, 18.0),
        (30, DType::BF16, 65839, 4096, 2.3665122985839844, 0.001220703125, 0.00124359130859375),
        (31, DType::I8, 199, 65536, -7852.0, -62.0, 55.0),
        (31, DType::BF16, 65839, 512, 0.3843994140625, 0.00146484375, 0.001617431640625),
        (32, DType::I8, 198, 32768, 790.0, -47.0, 52.0),
        (32, DType::BF16, 33060, 256, 0.19380950927734375, 0.00141143798828125, 0.00140380859375),
        (33, DType::F32, 146, 1024, 255.04028177261353, 0.8984578847885132, 1.0409740209579468),
        (34, DType::F32, 146, 1024, 259.271363735199, 0.9413055181503296, 1.2248072624206543),
        (35, DType::F32, 146, 1024, 255.7271534204483, 0.899718701839447, 1.0540822744369507),
        (36, DType::F32, 146, 1024, 256.5236340165138, 0.9790977239608765, 1.035066843032837),
        (37, DType::F32, 148, 8192, -0.16315742828010116, -0.16111980378627777, 0.2788403034210205),
    ];

    #[test]
    fn fixture_arrays_match_python_values_and_view_the_input() {
        let mut seen = 0;
        for i in 0..38 {
            let bytes = ByteView::from_vec(fixture_bytes(i));
            let base = bytes.as_slice().as_ptr() as usize;
            let arrays = match parse(bytes.clone(), &fixture_path(i)).unwrap() {
                StoredTensor::Plain(t) => vec![t],
                StoredTensor::Quantized { weight, scales } => vec![weight, scales],
            };
            let want: Vec<_> = FIXTURE_ARRAYS.iter().filter(|r| r.0 == i).collect();
            assert_eq!(arrays.len(), want.len(), "file {i}");
            for (t, &&(_, dtype, off, len, sum, first, last)) in arrays.iter().zip(&want) {
                assert_eq!(t.dtype, dtype, "file {i}");
                // Zero-copy: the payload is the BINBYTES argument inside the input buffer.
                assert_eq!(t.data.as_slice().as_ptr() as usize - base, off, "file {i}");
                assert_eq!(t.data.len(), len, "file {i}");
                let v = t.to_f32_vec();
                let got: f64 = v.iter().map(|&x| f64::from(x)).sum();
                assert!(
                    (got - sum).abs() <= 1e-9 * sum.abs().max(1.0),
                    "file {i}: {got} vs {sum}"
                );
                assert_eq!(f64::from(v[0]), first, "file {i}");
                assert_eq!(f64::from(v[v.len() - 1]), last, "file {i}");
                seen += 1;
            }
        }
        assert_eq!(seen, FIXTURE_ARRAYS.len());
    }

    #[test]
    fn every_prefix_of_a_fixture_is_refused_as_truncated() {
        for i in [1usize, 5] {
            let full = fixture_bytes(i);
            let step = if full.len() > 2000 { 7 } else { 1 };
            for n in (0..full.len()).step_by(step) {
                let off = match run(&full[..n]) {
                    Err(CheckpointError::Pickle { offset, msg, .. }) => {
                        assert!(
                            msg.contains("truncated") || msg.contains("empty file"),
                            "file {i} cut at {n}: {msg}"
                        );
                        offset
                    }
                    other => panic!("file {i} cut at {n}: {other:?}"),
                };
                assert!(off <= n, "offset {off} past the end {n}");
            }
        }
        // A cut inside a frame is caught at the FRAME; large payloads lie outside frames, and
        // a cut there is caught at the BINBYTES opcode.
        let full = fixture_bytes(1);
        assert_eq!(
            refused(&full[..600], "FRAME announces 1164 bytes but only 589"),
            2
        );
        let full = fixture_bytes(2);
        let off = refused(
            &full[..full.len() / 2],
            "BINBYTES needs 704512 bytes but only",
        );
        assert_eq!(off, 196);
    }

    #[test]
    fn payload_length_disagreeing_with_shape_is_refused() {
        // tensor00001: `M BININT2 256` at 87 is the shape; make it 255.
        let mut b = fixture_bytes(1);
        assert_eq!(&b[87..90], &[BININT2, 0, 1]);
        b[88] = 255;
        b[89] = 0;
        let off = refused(
            &b,
            "float32 array of shape [255] needs 1020 bytes but has 1024",
        );
        assert_eq!(off, 1173, "the array's BUILD");
        // And a crafted one with a shape whose size overflows.
        let big = array_pickle("f4", "<", &[i32::MAX, i32::MAX, i32::MAX], &[0; 4]);
        refused(&big, "overflows");
        let neg = array_pickle("f4", "<", &[-1], &[0; 4]);
        refused(&neg, "negative");
    }

    // --- hostile programs -------------------------------------------------------------------

    #[test]
    fn refuses_os_system_and_other_globals() {
        // `pickle.dumps(E(), 4)` for a class whose __reduce__ is (os.system, ('echo pwned',)),
        // with 'posix' (as CPython writes it on Linux) spelled 'os'.
        let os_system: &[u8] = b"\x80\x04\x95\x22\x00\x00\x00\x00\x00\x00\x00\
            \x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\necho pwned\x94\x85\x94R\x94.";
        assert_eq!(refused(os_system, "refusing global 'os.system'"), 25);
        // The same as CPython wrote it.
        let posix_system: &[u8] = b"\x80\x04\x95%\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\
            \x94\x8c\x06system\x94\x93\x94\x8c\necho pwned\x94\x85\x94R\x94.";
        assert_eq!(refused(posix_system, "refusing global 'posix.system'"), 28);
        // Protocol 2's text GLOBAL: `(builtins.eval, ('1+1',))`.
        let eval: &[u8] =
            b"\x80\x02c__builtin__\neval\nq\x00X\x03\x00\x00\x001+1q\x01\x85q\x02Rq\x03.";
        assert_eq!(refused(eval, "refusing global '__builtin__.eval'"), 2);
        let mut o = vec![PROTO, 4];
        global(&mut o, "builtins", "eval");
        refused(&o, "refusing global 'builtins.eval'");
        // A near miss of an allowed name.
        let mut o = vec![PROTO, 4];
        global(&mut o, "numpy.core.multiarray", "scalar");
        refused(&o, "numpy.core.multiarray.scalar");
    }

    #[test]
    fn refuses_calls_other_than_reconstruct_and_dtype() {
        // REDUCE of an allowed class that is not a function we interpret.
        let mut o = vec![PROTO, 4];
        global(&mut o, "numpy", "ndarray");
        o.extend_from_slice(&[EMPTY_TUPLE, REDUCE, STOP]);
        assert_eq!(refused(&o, "REDUCE may only call"), 20);
        // REDUCE of QuantizedWeight8bit (it must come through NEWOBJ).
        let mut o = vec![PROTO, 4];
        global(&mut o, "__main__", "QuantizedWeight8bit");
        o.extend_from_slice(&[EMPTY_TUPLE, REDUCE, STOP]);
        refused(&o, "REDUCE may only call");
        // NEWOBJ of anything else, or with arguments.
        let mut o = vec![PROTO, 4];
        global(&mut o, "numpy", "ndarray");
        o.extend_from_slice(&[EMPTY_TUPLE, NEWOBJ, STOP]);
        refused(&o, "NEWOBJ may only create");
        let mut o = vec![PROTO, 4];
        global(&mut o, "__main__", "QuantizedWeight8bit");
        o.extend_from_slice(&[NONE, TUPLE1, NEWOBJ, STOP]);
        refused(&o, "NEWOBJ may only create");
        // _reconstruct with the wrong class, and dtype with a non-string descriptor.
        let mut o = vec![PROTO, 4];
        global(&mut o, "numpy.core.multiarray", "_reconstruct");
        global(&mut o, "numpy", "dtype");
        o.extend_from_slice(&[EMPTY_TUPLE, SHORT_BINBYTES, 1, b'b', TUPLE3, REDUCE, STOP]);
        refused(&o, "_reconstruct must be called as");
        let mut o = vec![PROTO, 4];
        global(&mut o, "numpy", "dtype");
        o.extend_from_slice(&[NONE, NEWFALSE, NEWTRUE, TUPLE3, REDUCE, STOP]);
        refused(&o, "numpy.dtype must be called as");
        // The result must be an array or a QuantizedWeight8bit.
        refused(&[PROTO, 4, NONE, STOP], "holds a None");
        refused(&[PROTO, 4, EMPTY_DICT, STOP], "holds a dict");
        let mut o = vec![PROTO, 4];
        global(&mut o, "numpy", "dtype");
        o.push(STOP);
        refused(&o, "holds a global numpy.dtype");
    }

    #[test]
    fn refuses_unknown_and_unlisted_opcodes() {
        assert_eq!(refused(b"\x80\x04\xff.", "unknown opcode 0xff"), 2);
        refused(b"\x80\x04I1\n.", "opcode INT (0x49) is not allowed");
        refused(b"\x80\x04P1\n.", "PERSID");
        refused(b"\x80\x04\x82\x01.", "EXT1");
        refused(b"\x80\x04]\x94.", "EMPTY_LIST");
        refused(b"\x80\x04\x97.", "NEXT_BUFFER");
        refused(b"\x80\x04\x92.", "NEWOBJ_EX");
        refused(b"\x80\x04N\x81.", "stack underflow");
        refused(b"\x80\x09N.", "pickle protocol 9");
        refused(b"\x80\x01N.", "pickle protocol 1");
        refused(b"", "empty file");
    }

    #[test]
    fn huge_length_fields_fail_without_allocating() {
        let max8 = u64::MAX.to_le_bytes();
        for op in [BINBYTES8, BINUNICODE8, FRAME] {
            let mut o = vec![PROTO, 4, op];
            o.extend_from_slice(&max8);
            o.extend_from_slice(b"abc.");
            assert_eq!(refused(&o, "18446744073709551615 bytes"), 2);
        }
        for op in [BINBYTES, BINUNICODE] {
            let mut o = vec![PROTO, 4, op];
            o.extend_from_slice(&u32::MAX.to_le_bytes());
            o.extend_from_slice(b"abc.");
            assert_eq!(refused(&o, "needs 4294967295 bytes but only 4 remain"), 2);
        }
        // A string that fits the file but not the name limit.
        let mut o = vec![PROTO, 4, BINUNICODE];
        o.extend_from_slice(&((MAX_STR + 1) as u32).to_le_bytes());
        o.extend(std::iter::repeat_n(b'a', MAX_STR + 1));
        o.push(STOP);
        refused(&o, "longer than any name");
        // GLOBAL lines without an end.
        refused(b"\x80\x02cnumpy", "no end of line");
        let mut o = b"\x80\x02c".to_vec();
        o.extend(std::iter::repeat_n(b'a', MAX_STR + 10));
        refused(&o, "line longer than");
        // Memo indices are looked up, not allocated.
        refused(
            b"\x80\x04j\xff\xff\xff\xff.",
            "memo entry 4294967295 was never stored",
        );
        refused(
            b"\x80\x04\x8a\x09\x01\x02\x03\x04\x05\x06\x07\x08\x09.",
            "LONG1 integer of 9 bytes",
        );
    }

    #[test]
    fn bounds_on_stack_marks_memo_and_nesting() {
        let mut o = vec![PROTO, 4];
        o.extend(std::iter::repeat_n(NONE, MAX_STACK + 1));
        assert_eq!(refused(&o, "stack deeper than"), 2 + MAX_STACK);
        let mut o = vec![PROTO, 4];
        o.extend(std::iter::repeat_n(MARK, MAX_MARKS + 1));
        refused(&o, "nested MARKs");
        let mut o = vec![PROTO, 4, NONE];
        for i in 0..=MAX_MEMO as u32 {
            o.push(LONG_BINPUT);
            o.extend_from_slice(&i.to_le_bytes());
        }
        refused(&o, "memo entries");
        let mut o = vec![PROTO, 4, NONE];
        o.extend(std::iter::repeat_n(TUPLE1, 1000));
        refused(&o, "tuples nested deeper than 32");
        // Values are shared, not copied: a tuple with 2^30 leaves costs 30 small tuples.
        let mut o = vec![PROTO, 4, NONE];
        for k in 0..30u8 {
            o.extend_from_slice(&[MEMOIZE, BINGET, k, TUPLE2]);
        }
        o.push(STOP);
        refused(&o, "holds a tuple of 2 items");
        // Pops never reach below a MARK.
        refused(&[PROTO, 4, NONE, MARK, TUPLE1, STOP], "stack underflow");
        refused(&[PROTO, 4, MARK, MEMOIZE, STOP], "stack underflow");
        refused(&[PROTO, 4, TUPLE, STOP], "TUPLE without a MARK");
        // Trailing bytes and unclosed marks at STOP.
        let mut ok = array_pickle("f4", "<", &[1], &[0; 4]);
        plain(run(&ok));
        ok.push(NONE);
        refused(&ok, "1 bytes after STOP");
        refused(&[PROTO, 4, MARK, NONE, STOP], "MARK still open");
        refused(&[PROTO, 4, NONE, NONE, STOP], "2 values on the stack");
    }

    #[test]
    fn dtypes_byte_orders_and_layouts() {
        let f16 = plain(run(&array_pickle(
            "f2",
            "<",
            &[2],
            &[0x00, 0x3c, 0x00, 0xc0],
        )));
        assert_eq!((f16.dtype, f16.to_f32_vec()), (DType::F16, vec![1.0, -2.0]));
        let u8_ = plain(run(&array_pickle("u1", "|", &[1, 2], &[7, 255])));
        assert_eq!((u8_.dtype, u8_.shape.clone()), (DType::U8, vec![1, 2]));
        let i4 = plain(run(&array_pickle("i4", "<", &[], &(-5i32).to_le_bytes())));
        assert_eq!((i4.dtype, i4.to_f32_vec()), (DType::I32, vec![-5.0]));
        let i1 = plain(run(&array_pickle("<i1", "|", &[0, 3], &[])));
        assert_eq!((i1.dtype, i1.numel()), (DType::I8, 0));
        // numpy 2 spells the module `numpy._core.multiarray`; bf16 is the ml_dtypes type.
        let mut o = vec![PROTO, 5];
        array(
            &mut o,
            "numpy._core.multiarray",
            None,
            "<",
            &[2],
            false,
            &[0x80, 0x3f, 0, 0xc0],
        );
        o.push(STOP);
        let bf = plain(run(&o));
        assert_eq!((bf.dtype, bf.to_f32_vec()), (DType::BF16, vec![1.0, -2.0]));

        refused(
            &array_pickle("f4", ">", &[1], &[0; 4]),
            "big-endian dtype '>f4'",
        );
        refused(
            &array_pickle(">f4", "<", &[1], &[0; 4]),
            "big-endian dtype '>f4'",
        );
        refused(&array_pickle("f4", "|", &[1], &[0; 4]), "byte order '|'");
        refused(&array_pickle("f4", "=", &[1], &[0; 4]), "byte order '='");
        refused(
            &array_pickle("f8", "<", &[1], &[0; 8]),
            "unsupported dtype 'f8' (float64)",
        );
        refused(
            &array_pickle("i2", "<", &[1], &[0; 2]),
            "unsupported dtype 'i2' (int16)",
        );
        refused(&array_pickle("O", "|", &[1], &[0; 8]), "Python objects");
        let mut o = vec![PROTO, 4];
        array(
            &mut o,
            "numpy.core.multiarray",
            Some("f4"),
            "<",
            &[2, 2],
            true,
            &[0; 16],
        );
        o.push(STOP);
        refused(&o, "Fortran-order");
    }

    #[test]
    fn quantized_weight_needs_both_fields() {
        let qw = |fields: &[&str]| {
            let mut o = vec![PROTO, 4];
            global(&mut o, "__main__", "QuantizedWeight8bit");
            o.extend_from_slice(&[EMPTY_TUPLE, NEWOBJ, EMPTY_DICT, MARK]);
            for f in fields {
                s(&mut o, f);
                array(
                    &mut o,
                    "numpy.core.multiarray",
                    Some("i1"),
                    "|",
                    &[2, 1],
                    false,
                    &[1, 2],
                );
            }
            o.extend_from_slice(&[SETITEMS, BUILD, STOP]);
            run(&o)
        };
        match qw(&["weight", "scales"]) {
            Ok(StoredTensor::Quantized { weight, scales }) => {
                assert_eq!(weight.shape, vec![2, 1]);
                assert_eq!(scales.data.as_slice(), &[1, 2]);
            }
            other => panic!("{other:?}"),
        }
        assert!(qw(&["weight"])
            .unwrap_err()
            .to_string()
            .contains("both weight and scales"));
        assert!(qw(&["weight", "scales", "bias"])
            .unwrap_err()
            .to_string()
            .contains("'bias'"));
    }

    // --- robustness -------------------------------------------------------------------------

    /// xorshift64*: deterministic, dependency-free.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
        /// A position, biased to the opcode-dense head and tail of a file.
        fn pos(&mut self, len: usize) -> usize {
            match self.below(4) {
                0 | 1 => self.below(len.min(320)),
                2 => len.saturating_sub(1 + self.below(len.min(320))),
                _ => self.below(len),
            }
        }
    }

    const INTERESTING: [[u8; 4]; 6] = [
        [0xff; 4],
        [0; 4],
        [0x7f, 0xff, 0xff, 0xff],
        [0xff, 0xff, 0xff, 0x7f],
        [0, 0, 0, 0x80],
        [1, 0, 0, 0],
    ];

    #[test]
    fn mutated_fixtures_never_panic() {
        // Small files of each kind (plain, quantized with G=1 and G=8), and a large one rarely.
        let small: Vec<Vec<u8>> = [1usize, 5, 6, 7, 13]
            .iter()
            .map(|&i| fixture_bytes(i))
            .collect();
        let large = fixture_bytes(2);
        let ops: Vec<u8> = (0u8..=255).filter(|&b| opcode_name(b).is_some()).collect();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut ok, mut err) = (0usize, 0usize);
        const N: usize = 20_000;
        for _ in 0..N {
            let mut b = if rng.below(64) == 0 {
                large.clone()
            } else {
                small[rng.below(small.len())].clone()
            };
            for _ in 0..1 + rng.below(4) {
                let len = b.len();
                let p = rng.pos(len);
                match rng.below(8) {
                    0 if len > 0 => b[p.min(len - 1)] = rng.next() as u8,
                    1 if len > 0 => b[p.min(len - 1)] ^= 1 << rng.below(8),
                    2 => b.truncate(p),
                    3 => {
                        let n = 1 + rng.below(8);
                        let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                        b.splice(p.min(len)..p.min(len), ins);
                    }
                    4 => {
                        let end = (p + 1 + rng.below(16)).min(len);
                        b.drain(p.min(end)..end);
                    }
                    5 if len >= 4 => {
                        let at = p.min(len - 4);
                        b[at..at + 4].copy_from_slice(&INTERESTING[rng.below(INTERESTING.len())]);
                    }
                    6 if len > 0 => {
                        let from = rng.pos(len);
                        let end = (from + 1 + rng.below(64)).min(len);
                        let chunk = b[from..end].to_vec();
                        b.splice(p.min(len)..p.min(len), chunk);
                    }
                    _ if len > 0 => b[p.min(len - 1)] = ops[rng.below(ops.len())],
                    _ => {}
                }
            }
            match run(&b) {
                Ok(_) => ok += 1,
                Err(CheckpointError::Pickle { file, .. }) => {
                    assert_eq!(file, name());
                    err += 1;
                }
                Err(e) => panic!("unexpected error kind: {e}"),
            }
        }
        eprintln!("{N} mutations: {ok} parsed, {err} refused");
        assert_eq!(ok + err, N);
        assert!(err > N / 2);
    }

    #[test]
    fn random_opcode_programs_never_panic() {
        let names = [
            "numpy.core.multiarray",
            "_reconstruct",
            "numpy",
            "ndarray",
            "dtype",
            "f4",
            "i1",
            "ml_dtypes",
            "bfloat16",
            "__main__",
            "QuantizedWeight8bit",
            "weight",
            "scales",
            "<",
            "|",
        ];
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let (mut ok, mut err) = (0usize, 0usize);
        const N: usize = 20_000;
        for _ in 0..N {
            let mut o = vec![PROTO, 2 + rng.below(4) as u8];
            for _ in 0..rng.below(80) {
                match rng.below(24) {
                    0 => s(&mut o, names[rng.below(names.len())]),
                    1 => o.extend_from_slice(&[BININT1, rng.below(4) as u8]),
                    2 => int(&mut o, rng.below(6) as i32 - 1),
                    3 => {
                        let n = rng.below(9);
                        o.extend_from_slice(&[SHORT_BINBYTES, n as u8]);
                        o.extend((0..n).map(|_| rng.next() as u8));
                    }
                    4 => o.push(MARK),
                    5 => o.push(TUPLE),
                    6 => o.push([TUPLE1, TUPLE2, TUPLE3, EMPTY_TUPLE][rng.below(4)]),
                    7 => o.push(STACK_GLOBAL),
                    8 => o.push(REDUCE),
                    9 => o.push(BUILD),
                    10 => o.push(NEWOBJ),
                    11 => o.push(MEMOIZE),
                    12 => o.extend_from_slice(&[BINGET, rng.below(8) as u8]),
                    13 => o.push(EMPTY_DICT),
                    14 => o.push(SETITEMS),
                    15 => o.push(SETITEM),
                    16 => o.push([NONE, NEWTRUE, NEWFALSE][rng.below(3)]),
                    17 => {
                        let m = ["numpy.core.multiarray", "numpy", "__main__", "os"];
                        let n = ["_reconstruct", "ndarray", "dtype", "QuantizedWeight8bit"];
                        global(&mut o, m[rng.below(4)], n[rng.below(4)])
                    }
                    18 => {
                        let mut a = Vec::new();
                        let d = [Some("f4"), Some("i1"), None][rng.below(3)];
                        let n = rng.below(4) as i32;
                        let len = (n as usize) * [4, 1, 2][rng.below(3)];
                        array(
                            &mut a,
                            "numpy.core.multiarray",
                            d,
                            "<",
                            &[n],
                            false,
                            &vec![0; len],
                        );
                        o.extend(a);
                    }
                    19 => o.push(rng.next() as u8),
                    20 => o.extend_from_slice(&[LONG1, rng.below(10) as u8, 0xff, 0x80]),
                    21 => o.extend_from_slice(&[BINPUT, rng.below(8) as u8]),
                    22 => o.extend_from_slice(b"cnumpy\ndtype\n"),
                    _ if rng.below(8) == 0 => o.push(STOP),
                    _ => o.push(TUPLE3),
                }
            }
            o.push(STOP);
            match run(&o) {
                Ok(_) => ok += 1,
                Err(CheckpointError::Pickle { .. }) => err += 1,
                Err(e) => panic!("unexpected error kind: {e}"),
            }
        }
        eprintln!("{N} random programs: {ok} parsed, {err} refused");
        assert_eq!(ok + err, N);
    }
}
