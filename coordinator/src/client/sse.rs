//! Server-sent events, read incrementally: bytes in (split anywhere), `data` payloads out.
//! Only what OpenAI-style streams use: `data:` fields (multi-line joined with `\n`), comment
//! lines and other fields skipped, events ended by a blank line, `\n` or `\r\n` line ends.

/// Longest event accepted: a server that never ends its event must not exhaust memory.
const MAX_EVENT_BYTES: usize = 16 << 20;

#[derive(Default)]
pub struct SseParser {
    /// Bytes of an unfinished line.
    line: Vec<u8>,
    /// `data` of the event being read.
    data: Option<String>,
}

impl SseParser {
    /// Feeds bytes; returns the `data` of every event they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                if self.line.len() + self.data.as_ref().map_or(0, String::len) > MAX_EVENT_BYTES {
                    return Err(format!("an SSE event is over {MAX_EVENT_BYTES} bytes"));
                }
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line =
                String::from_utf8(line).map_err(|_| "the stream is not UTF-8".to_string())?;
            if line.is_empty() {
                if let Some(d) = self.data.take() {
                    out.push(d);
                }
                continue;
            }
            if let Some(v) = line.strip_prefix("data:") {
                let v = v.strip_prefix(' ').unwrap_or(v);
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(v);
                    }
                    None => self.data = Some(v.to_string()),
                }
            }
            // Comments (`:`), `event:`, `id:`, `retry:`: nothing an OpenAI stream needs.
        }
        Ok(out)
    }

    /// The stream ended: an event cut off before its blank line is an error.
    pub fn finish(self) -> Result<(), String> {
        if self.data.is_some() || !self.line.is_empty() {
            return Err("the stream ended in the middle of an event".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let raw = ": comment\r\ndata: {\"a\":1}\r\n\r\nevent: x\ndata: two\ndata:lines\n\ndata: [DONE]\n\n";
        for cut in 0..raw.len() {
            let mut p = SseParser::default();
            let mut got = p.push(&raw.as_bytes()[..cut]).unwrap();
            got.extend(p.push(&raw.as_bytes()[cut..]).unwrap());
            p.finish().unwrap();
            assert_eq!(got, ["{\"a\":1}", "two\nlines", "[DONE]"], "cut at {cut}");
        }
    }

    #[test]
    fn a_cut_off_event_is_an_error() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\":").unwrap().is_empty());
        assert!(p.finish().is_err());
        let mut p = SseParser::default();
        p.push(b"data: x\n").unwrap();
        assert!(p.finish().is_err());
    }

    #[test]
    fn endless_events_and_bad_bytes_are_refused() {
        let mut p = SseParser::default();
        let big = vec![b'a'; MAX_EVENT_BYTES + 1];
        assert!(p.push(&big).is_err());
        let mut p = SseParser::default();
        assert!(p.push(b"data: \xff\xfe\n\n").is_err());
    }
}
