use super::model_proto::{ModelProto, ModelType, PieceType, SentencePiece};
use super::*;

use crate::test_support::reference_dir;

struct Vector {
    text: String,
    ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct RawVector {
    text: String,
    ids: Vec<u32>,
}

fn vectors() -> Vec<Vector> {
    let path = reference_dir().join("grok1/tokenizer-vectors.jsonl");
    let data = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let out: Vec<Vector> = data
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            let raw: RawVector = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1));
            Vector {
                text: raw.text,
                ids: raw.ids,
            }
        })
        .collect();
    assert_eq!(out.len(), 1000, "expected 1000 reference vectors");
    out
}

/// The builtin tokenizer, parsed once for all tests.
fn tok() -> &'static Tokenizer {
    static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOK.get_or_init(|| Tokenizer::builtin().expect("builtin model parses"))
}

fn builtin_proto() -> ModelProto {
    ModelProto::decode(BUILTIN_MODEL).expect("builtin model is a valid protobuf")
}

fn from_proto(proto: ModelProto) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_proto(proto, "<test>".to_owned())
}

/// Id of byte piece `<0xXX>` in the Grok-1 vocabulary.
fn byte_id(tok: &Tokenizer, b: u8) -> u32 {
    tok.piece_to_id(&format!("<0x{b:02X}>"))
        .expect("byte piece exists")
}

/// Decodes through the stream, checking each chunk, and returns the concatenation.
fn stream_decode(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut stream = tok.decode_stream();
    let mut text = String::new();
    for &id in ids {
        if let Some(chunk) = stream.step(id).expect("ids are in range") {
            assert!(
                !chunk.is_empty(),
                "step returned an empty chunk for {ids:?}"
            );
            text.push_str(&chunk);
        }
    }
    text.push_str(&stream.finish());
    text
}

/// Tiny deterministic PRNG (xorshift64*), so the randomized tests need no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn builtin_model_settings() {
    let tok = tok();
    assert_eq!(tok.vocab_size(), 131_072);
    assert_eq!(tok.pad_id(), Some(0));
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.unk_id(), 3);
    assert_eq!(tok.id_to_piece(1), Some("[BOS]"));
    assert_eq!(tok.id_to_piece(131_072), None);
    assert_eq!(tok.piece_kind(1), Some(PieceKind::Control));
    assert_eq!(tok.piece_kind(3), Some(PieceKind::Unknown));
    assert_eq!(tok.piece_kind(4), Some(PieceKind::UserDefined));
    assert_eq!(tok.piece_to_id("<0x00>"), Some(69));
    assert_eq!(tok.piece_kind(69), Some(PieceKind::Byte));
    assert_eq!(tok.piece_to_id("[EOS]"), Some(2));
    assert_eq!(
        tok.normalizer,
        Normalizer {
            add_dummy_prefix: true,
            remove_extra_whitespaces: false,
            escape_whitespaces: true,
        }
    );
    assert!(tok.byte_fallback);
    assert!(!tok.has_unused);

    let proto = builtin_proto();
    let norm = proto.normalizer_spec.clone().unwrap_or_default();
    assert_eq!(norm.name(), "identity");
    assert!(norm.precompiled_charsmap().is_empty());
    let trainer = proto.trainer_spec.clone().unwrap_or_default();
    assert_eq!(trainer.model_type, Some(ModelType::Bpe as i32));
    assert!(trainer.split_digits());
    assert!(trainer.allow_whitespace_only_pieces());
    assert!(!trainer.treat_whitespace_as_suffix());
    assert_eq!(trainer.unk_surface(), "[UNK]");
}

#[test]
fn from_file_matches_builtin_and_reports_path() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tokenizer.model");
    let from_file = Tokenizer::from_file(&path).expect("asset loads");
    let builtin = tok();
    assert_eq!(from_file.vocab_size(), builtin.vocab_size());
    let text = "Grok-1 tokenizer from file: 123 ü 🚀";
    assert_eq!(from_file.encode(text), builtin.encode(text));

    let missing = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/no-such.model");
    let err = Tokenizer::from_file(&missing).expect_err("missing file");
    assert!(matches!(err, TokenizerError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such.model"), "{err}");
}

#[test]
fn encode_matches_reference_vectors() {
    let tok = tok();
    let mut mismatches = Vec::new();
    for (i, v) in vectors().iter().enumerate() {
        let got = tok.encode(&v.text);
        if got != v.ids {
            mismatches.push(format!(
                "line {}: text {:?}\n  expected {:?}\n  got      {:?}",
                i + 1,
                v.text,
                v.ids,
                got
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of 1000 vectors differ:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(20)].join("\n")
    );
}

#[test]
fn decode_round_trips_reference_vectors() {
    // Identity normalization without remove_extra_whitespaces loses nothing, so decoding
    // gives back the exact input (SentencePiece's decode agrees on all 1000 vectors).
    let tok = tok();
    for v in vectors() {
        assert_eq!(
            tok.decode(&v.ids).expect("decode"),
            v.text,
            "ids {:?}",
            v.ids
        );
        assert_eq!(tok.decode(&tok.encode(&v.text)).expect("decode"), v.text);
    }
}

#[test]
fn decode_stream_matches_decode_on_vectors() {
    let tok = tok();
    for v in vectors() {
        let full = tok.decode(&v.ids).expect("decode");
        let streamed = stream_decode(tok, &v.ids);
        assert_eq!(streamed, full, "text {:?}", v.text);
        assert_eq!(
            streamed.matches('\u{FFFD}').count(),
            full.matches('\u{FFFD}').count(),
            "text {:?}",
            v.text
        );
    }
}

#[test]
fn decode_stream_matches_decode_on_random_ids() {
    // Byte-heavy random sequences exercise held-back, completed and broken characters.
    let tok = tok();
    let specials = [0u32, 1, 2, 3, 4, 325, 130_089, 21_560, 47];
    let utf8_bytes: Vec<u8> = "é€🚀日本語 a\u{10FFFF}".bytes().collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..3000 {
        let len = rng.below(12) as usize;
        let ids: Vec<u32> = (0..len)
            .map(|_| match rng.below(10) {
                0..=3 => byte_id(tok, utf8_bytes[rng.below(utf8_bytes.len() as u64) as usize]),
                4..=6 => byte_id(tok, rng.below(256) as u8),
                7 => specials[rng.below(specials.len() as u64) as usize],
                _ => rng.below(tok.vocab_size() as u64) as u32,
            })
            .collect();
        let full = tok.decode(&ids).expect("decode");
        assert_eq!(stream_decode(tok, &ids), full, "ids {ids:?}");
    }
}

#[test]
fn decode_stream_holds_back_partial_characters() {
    let tok = tok();
    let euro: Vec<u32> = [0xE2, 0x82, 0xAC]
        .iter()
        .map(|&b| byte_id(tok, b))
        .collect();
    let mut stream = tok.decode_stream();
    assert_eq!(stream.step(euro[0]).expect("step"), None);
    assert_eq!(stream.step(euro[1]).expect("step"), None);
    assert_eq!(stream.step(euro[2]).expect("step"), Some("€".to_owned()));
    // A broken prefix is released at once, as SentencePiece would decode it.
    assert_eq!(stream.step(byte_id(tok, 0xE0)).expect("step"), None);
    assert_eq!(
        stream.step(byte_id(tok, 0x41)).expect("step"),
        Some("\u{FFFD}A".to_owned())
    );
    // An unfinished character at the end becomes one U+FFFD per byte.
    assert_eq!(stream.step(byte_id(tok, 0xF0)).expect("step"), None);
    assert_eq!(stream.step(byte_id(tok, 0x9F)).expect("step"), None);
    assert_eq!(stream.finish(), "\u{FFFD}\u{FFFD}");

    let mut stream = tok.decode_stream();
    assert!(matches!(
        stream.step(131_072),
        Err(TokenizerError::IdOutOfRange { id: 131_072, .. })
    ));
}

#[test]
fn decode_matches_sentencepiece_edge_cases() {
    // Expected strings from the reference SentencePiece library (python `sp.decode`).
    let tok = tok();
    let hello = tok.piece_to_id("\u{2581}hello").expect("piece");
    assert_eq!(hello, 21_560);
    let b = |bytes: &[u8]| -> Vec<u32> { bytes.iter().map(|&x| byte_id(tok, x)).collect() };
    let cat = |parts: &[&[u32]]| -> Vec<u32> { parts.concat() };
    let cases: Vec<(Vec<u32>, &str)> = vec![
        (b(&[0xE2, 0x82]), "\u{FFFD}\u{FFFD}"),
        (b(&[0xE2, 0x82, 0xAC]), "€"),
        (b(&[0xEF, 0xBF, 0xBD]), "\u{FFFD}"),
        (b(&[0xE0, 0x80, 0x80]), "\u{FFFD}\u{FFFD}\u{FFFD}"),
        (b(&[0xED, 0xA0, 0x80]), "\u{FFFD}\u{FFFD}\u{FFFD}"),
        (b(&[0xC0, 0x80]), "\u{FFFD}\u{FFFD}"),
        (b(&[0xE2, 0x82, 0x41]), "\u{FFFD}\u{FFFD}A"),
        (
            b(&[0xF4, 0x90, 0x80, 0x80]),
            "\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}",
        ),
        (
            cat(&[&b(&[0xF0, 0x9F, 0x98]), &[4], &b(&[0x80])]),
            "\u{FFFD}\u{FFFD}\u{FFFD}\n\u{FFFD}",
        ),
        (cat(&[&b(&[0x41]), &[hello]]), "A hello"),
        (
            cat(&[&b(&[0xE2]), &[1], &b(&[0x82, 0xAC])]),
            "\u{FFFD}\u{FFFD}\u{FFFD}",
        ),
        (vec![hello, hello], "hello hello"),
        (vec![3, hello], "[UNK] hello"),
        (vec![1, 2, hello], "hello"),
        (vec![1, 3, 2], "[UNK]"),
        (vec![130_089, 1, hello], " hello"),
        (vec![1, 130_089, hello], " hello"),
        (vec![130_089, 130_089, hello], "  hello"),
        (vec![325, hello], "  hello"),
        (vec![0, 1, 2], ""),
        (vec![], ""),
    ];
    for (ids, want) in cases {
        assert_eq!(tok.decode(&ids).expect("decode"), want, "ids {ids:?}");
        assert_eq!(stream_decode(tok, &ids), want, "stream, ids {ids:?}");
    }
}

#[test]
fn decode_out_of_range_id_is_error() {
    let tok = tok();
    let err = tok.decode(&[21_560, 131_072]).expect_err("out of range");
    assert!(
        matches!(
            err,
            TokenizerError::IdOutOfRange {
                id: 131_072,
                vocab_size: 131_072
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("131072"), "{err}");
    assert!(tok.decode(&[u32::MAX]).is_err());
}

#[test]
fn control_token_text_stays_text() {
    let tok = tok();
    // Reference ids from the SentencePiece library.
    assert_eq!(tok.encode("[BOS]"), [794, 130_131, 2917, 130_165]);
    assert_eq!(tok.encode("<s> hi"), [687, 130_096, 130_151, 16_462]);
    for text in [
        "[BOS]",
        "[EOS]",
        "[PAD]",
        "[UNK]",
        "<s>",
        "</s>",
        "<unk>",
        "x[BOS]y",
        "[BOS][EOS]",
    ] {
        let ids = tok.encode(text);
        assert!(
            ids.iter().all(|&id| !matches!(
                tok.piece_kind(id),
                Some(PieceKind::Control | PieceKind::Unknown)
            )),
            "{text:?} -> {ids:?}"
        );
        assert_eq!(tok.decode(&ids).expect("decode"), text);
    }
}

#[test]
fn user_defined_symbols_and_byte_fallback() {
    let tok = tok();
    // Reference ids from the SentencePiece library.
    assert_eq!(tok.encode("<|mask|>x"), [130_089, 48, 130_122]);
    assert_eq!(tok.encode("12345"), [130_089, 15, 16, 17, 18, 19]);
    assert_eq!(
        tok.encode("\n\n\n\n\n\n\n\n\n\n\n\nx"),
        [130_089, 13, 5, 130_122]
    );
    assert_eq!(tok.encode("\t\t a"), [130_089, 25, 327]);
    // Space runs are escaped to ▁ before matching, so the literal-space user pieces never match.
    assert_eq!(tok.encode("a  b"), [327, 325, 130_110]);
    assert_eq!(
        tok.encode("😀x\u{300}"),
        [130_089, 309, 228, 221, 197, 130_122, 273, 197]
    );
    assert_eq!(tok.encode(""), Vec::<u32>::new());
}

#[test]
fn normalizer_variants_match_sentencepiece() {
    // Ids and decoded text from the reference library run on the Grok-1 model with one
    // normalizer flag changed; covers the paths the released settings do not use.
    type Case = (&'static str, &'static [u32], &'static str);
    let remove_extra: &[Case] = &[
        ("  hello   world  ", &[21560, 325, 1135], "hello   world"),
        ("a  b", &[327, 325, 130110], "a  b"),
        (" ", &[], ""),
        ("   ", &[], ""),
        (
            "\t x  \n  y ",
            &[130089, 24, 1734, 325, 4, 325, 130107],
            "\t x  \n  y",
        ),
        ("x     y", &[1734, 336, 385], "x     y"),
        ("x\u{2581} ", &[1734], "x"),
        ("", &[], ""),
    ];
    let no_dummy: &[Case] = &[
        (
            "  hello   world  ",
            &[325, 21329, 325, 1135, 325],
            "  hello   world  ",
        ),
        ("a  b", &[130092, 325, 130110], "a  b"),
        (" ", &[130089], " "),
        ("   ", &[1990], "   "),
        (
            "\t x  \n  y ",
            &[24, 1734, 325, 4, 325, 130107, 130089],
            "\t x  \n  y ",
        ),
        ("x     y", &[130122, 336, 385], "x     y"),
        ("x\u{2581} ", &[130122, 325], "x  "),
    ];
    let no_escape: &[Case] = &[
        (
            "  hello   world  ",
            &[33, 21329, 33, 8455, 32],
            "   hello   world  ",
        ),
        ("a  b", &[101, 130092, 32, 130110], " a  b"),
        (" ", &[32], "  "),
        ("   ", &[34], "    "),
        (
            "\t x  \n  y ",
            &[101, 24, 101, 130122, 32, 4, 32, 130107, 101],
            " \t x  \n  y ",
        ),
        ("x     y", &[101, 130122, 35, 130107], " x     y"),
        ("x\u{2581} ", &[101, 130122, 130089, 101], " x  "),
    ];
    type EditNormalizer = fn(&mut model_proto::NormalizerSpec);
    let variants: [(&str, EditNormalizer, &[Case]); 3] = [
        (
            "remove_extra_whitespaces",
            |n| n.remove_extra_whitespaces = Some(true),
            remove_extra,
        ),
        (
            "no add_dummy_prefix",
            |n| n.add_dummy_prefix = Some(false),
            no_dummy,
        ),
        (
            "no escape_whitespaces",
            |n| n.escape_whitespaces = Some(false),
            no_escape,
        ),
    ];
    for (name, edit, cases) in variants {
        let mut proto = builtin_proto();
        edit(proto.normalizer_spec.get_or_insert_with(Default::default));
        let tok = from_proto(proto).expect("variant loads");
        for &(text, ids, decoded) in cases {
            assert_eq!(tok.encode(text), ids, "{name}: encode {text:?}");
            assert_eq!(
                tok.decode(ids).expect("decode"),
                decoded,
                "{name}: decode {ids:?}"
            );
        }
    }
}

#[test]
fn hostile_model_bytes_are_errors_not_panics() {
    assert!(Tokenizer::from_bytes(&[]).is_err());
    assert!(Tokenizer::from_bytes(&[0xFF; 100]).is_err());
    assert!(Tokenizer::from_bytes(b"not a model at all").is_err());

    // Truncation anywhere inside the piece list, trainer spec or normalizer spec.
    let len = BUILTIN_MODEL.len();
    let mut cuts: Vec<usize> = (0..64).map(|k| len * k / 64).collect();
    cuts.extend([1, 2, 3, 7, 100, len - 1, len - 2]);
    for cut in cuts {
        let err = Tokenizer::from_bytes(&BUILTIN_MODEL[..cut]);
        assert!(
            err.is_err(),
            "model truncated to {cut} of {len} bytes was accepted"
        );
    }

    let mut rng = Rng(0x1234_5678_9abc_def1);
    for n in [1usize, 5, 17, 64, 1000, 65_536] {
        let garbage: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        assert!(
            Tokenizer::from_bytes(&garbage).is_err(),
            "{n} random bytes accepted"
        );
    }

    // Corrupted bytes may still parse; whatever loads must encode and decode without panics.
    for _ in 0..40 {
        let mut bytes = BUILTIN_MODEL.to_vec();
        for _ in 0..4 {
            let at = rng.below(len as u64) as usize;
            bytes[at] = rng.next() as u8;
        }
        if let Ok(tok) = Tokenizer::from_bytes(&bytes) {
            let ids = tok.encode("Hello, world! 123 \u{1F680} [BOS]");
            let _ = tok.decode(&ids);
        }
    }
}

#[test]
fn inconsistent_models_are_rejected() {
    let piece = |text: &str, kind: PieceType| SentencePiece {
        piece: Some(text.to_owned()),
        score: Some(0.0),
        r#type: Some(kind as i32),
    };
    type Edit = fn(&mut ModelProto, &dyn Fn(&str, PieceType) -> SentencePiece);
    let cases: [(&str, Edit, bool); 9] = [
        (
            "duplicate piece",
            |p, mk| p.pieces.push(mk("\u{2581}hello", PieceType::Normal)),
            false,
        ),
        (
            "control text clash",
            |p, mk| p.pieces.push(mk("[BOS]", PieceType::Normal)),
            false,
        ),
        (
            "no unk",
            |p, _| {
                p.pieces
                    .retain(|s| s.r#type != Some(PieceType::Unknown as i32))
            },
            false,
        ),
        (
            "two unks",
            |p, mk| p.pieces.push(mk("<unk2>", PieceType::Unknown)),
            false,
        ),
        (
            "bad byte piece",
            |p, mk| p.pieces.push(mk("<0xzz>", PieceType::Byte)),
            false,
        ),
        (
            "empty piece",
            |p, mk| p.pieces.push(mk("", PieceType::Normal)),
            false,
        ),
        (
            "unknown piece type",
            |p, _| p.pieces[500].r#type = Some(99),
            false,
        ),
        (
            "unigram",
            |p, _| {
                p.trainer_spec
                    .get_or_insert_with(Default::default)
                    .model_type = Some(ModelType::Unigram as i32)
            },
            true,
        ),
        (
            "charsmap",
            |p, _| {
                p.normalizer_spec
                    .get_or_insert_with(Default::default)
                    .precompiled_charsmap = Some(vec![1, 2, 3])
            },
            true,
        ),
    ];
    for (name, edit, is_unsupported) in cases {
        let mut proto = builtin_proto();
        edit(&mut proto, &piece);
        let err = from_proto(proto).expect_err(name);
        if is_unsupported {
            assert!(
                matches!(err, TokenizerError::Unsupported { .. }),
                "{name}: {err:?}"
            );
        } else {
            assert!(
                matches!(err, TokenizerError::InvalidModel { .. }),
                "{name}: {err:?}"
            );
        }
        assert!(err.to_string().contains("<test>"), "{name}: {err}");
    }

    let mut proto = builtin_proto();
    proto
        .trainer_spec
        .get_or_insert_with(Default::default)
        .byte_fallback = Some(false);
    assert!(
        from_proto(proto).is_err(),
        "byte pieces without byte_fallback"
    );
}

#[test]
fn models_without_byte_fallback_use_one_unk_per_run() {
    // Drop the byte pieces and disable fallback: unknown characters become [UNK], a run of
    // them a single [UNK], as SentencePiece does.
    let mut proto = builtin_proto();
    proto
        .pieces
        .retain(|s| s.r#type != Some(PieceType::Byte as i32));
    proto
        .trainer_spec
        .get_or_insert_with(Default::default)
        .byte_fallback = Some(false);
    let tok = from_proto(proto).expect("loads");
    let ids = tok.encode("a😀😀b");
    assert_eq!(
        ids.iter().filter(|&&id| id == tok.unk_id()).count(),
        1,
        "{ids:?}"
    );
    assert!(tok.decode(&ids).expect("decode").contains("[UNK]"));
}

#[test]
fn long_input_encodes_and_round_trips() {
    let tok = tok();
    let text: String = vectors()
        .iter()
        .map(|v| v.text.as_str())
        .collect::<Vec<_>>()
        .join("\n")
        .repeat(4);
    let ids = tok.encode(&text);
    assert_eq!(tok.decode(&ids).expect("decode"), text);
    let run = "a".repeat(100_000);
    assert_eq!(tok.decode(&tok.encode(&run)).expect("decode"), run);
}

/// Textbook SentencePiece BPE: rescan all adjacent pairs, merge the best (leftmost on ties).
/// Quadratic, with no word splitting or id-pair table, to cross-check the fast path.
fn naive_encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
    let norm = tok.normalizer.normalize(text, &tok.matcher);
    let mut syms: Vec<(String, bool)> = Vec::new();
    let mut rest = norm.as_str();
    while let Some(c) = rest.chars().next() {
        let (n, frozen) = match tok.matcher.longest_match(rest) {
            Some(n) => (n, true),
            None => (c.len_utf8(), false),
        };
        syms.push((rest[..n].to_owned(), frozen));
        rest = &rest[n..];
    }
    loop {
        let mut best: Option<(f32, usize)> = None;
        for i in 1..syms.len() {
            if syms[i - 1].1 || syms[i].1 {
                continue;
            }
            let merged = format!("{}{}", syms[i - 1].0, syms[i].0);
            if let Some(&id) = tok.piece_ids.get(merged.as_str()) {
                let score = tok.pieces[id as usize].score;
                if best.is_none_or(|(s, _)| score > s) {
                    best = Some((score, i - 1));
                }
            }
        }
        let Some((_, i)) = best else { break };
        let right = syms.remove(i + 1);
        syms[i].0.push_str(&right.0);
    }
    let mut ids = Vec::new();
    for (s, _) in syms {
        match tok.piece_ids.get(s.as_str()) {
            Some(&id) => ids.push(id),
            None => ids.extend(s.bytes().map(|b| byte_id(tok, b))),
        }
    }
    ids
}

#[test]
fn encode_matches_naive_bpe_on_random_text() {
    let tok = tok();
    let alphabet: Vec<&str> = vec![
        "a", "e", "t", "h", "o", "n", "s", "r", "i", "T", "Th", "the", "ing", " ", " ", " ", "  ",
        "\n", "\n\n", "\t", "0", "7", "42", ".", ",", "'", "-", "(", ")", "<|", "mask|>",
        "<|mask|>", "é", "ü", "日", "本", "語", "中", "文", "🚀", "😀", "\u{300}", "▁", "[BOS]",
        "<s>", "ß", "д", "ж", "ا", "ل", "ि", "क",
    ];
    let mut rng = Rng(42);
    for _ in 0..2000 {
        let n = rng.below(30) as usize;
        let text: String = (0..n)
            .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
            .collect();
        assert_eq!(tok.encode(&text), naive_encode(tok, &text), "text {text:?}");
    }
    for v in vectors().iter().take(300) {
        assert_eq!(
            tok.encode(&v.text),
            naive_encode(tok, &v.text),
            "text {:?}",
            v.text
        );
    }
}
