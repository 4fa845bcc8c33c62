//! The control socket's wire format: JSON lines, one request and one reply per line.
//!
//! A request is `{"command":"status"}` (or, for older clients, the bare word `status`);
//! commands are `status`, `pause`, `resume`, `shutdown` (graceful, forced after the
//! configured timeout) and `kill` ([`Request`], parsed by [`parse_request`]). Each request
//! gets one reply line ([`Reply`]):
//! `{"ok":true,"state":"running","vcpus":2,"uptime_ms":12,"pid":42}` or
//! `{"ok":false,"error":"..."}`. [`LineBuffer`] frames a client's bytes into request lines of
//! at most [`MAX_REQUEST_LINE`] bytes; [`read_reply_line`] reads a reply of at most
//! [`MAX_REPLY_LINE`] bytes.

use std::io::{BufRead, Read};

use serde::{Deserialize, Serialize};

use crate::{RunState, VmmError};

/// Longest request line the control socket accepts (bytes, newline excluded).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// A control request. Serialized alone it is its command word (`"status"`); a request
/// line is the [`RequestLine`] object `{"command":"status"}` ([`Request::to_line`]), and
/// [`parse_request`] also takes the bare word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Request {
    /// Report the run state.
    Status,
    /// Park every vCPU.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Graceful shutdown (Ctrl-Alt-Del), forced after the shutdown timeout.
    Shutdown,
    /// Stop at once.
    Kill,
}

/// The JSON form of a request line. Not `#[serde(tag = "command")]` on [`Request`]: serde
/// ignores unknown fields beside the tag of a unit variant, and a line with any field but
/// `command` has always been refused.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    command: Request,
}

impl Request {
    /// Every request, for the bare-word form.
    const ALL: [Request; 5] = [
        Request::Status,
        Request::Pause,
        Request::Resume,
        Request::Shutdown,
        Request::Kill,
    ];

    /// The command word (the value of `command` on the wire).
    pub fn as_str(self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Shutdown => "shutdown",
            Request::Kill => "kill",
        }
    }

    /// The request named by a bare command word, in any case.
    fn from_word(word: &str) -> Option<Request> {
        Request::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(word))
    }

    /// The request as one JSON line (without the newline).
    pub fn to_line(self) -> String {
        serde_json::to_string(&RequestLine { command: self }).unwrap_or_else(|_| String::from("{}"))
    }
}

/// Parses one request line: a JSON object `{"command":"..."}` or a bare command word
/// (any case). Surrounding whitespace is ignored.
pub fn parse_request(line: &str) -> Result<Request, VmmError> {
    let line = line.trim();
    if line.starts_with('{') {
        return serde_json::from_str::<RequestLine>(line)
            .map(|r| r.command)
            .map_err(|e| VmmError::Control(format!("bad request: {e}")));
    }
    Request::from_word(line).ok_or_else(|| {
        VmmError::Control(format!(
            "unknown command {:?}",
            line.chars().take(64).collect::<String>()
        ))
    })
}

/// The state part of a successful reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    /// Run state.
    pub state: RunState,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Milliseconds since the VM was created.
    pub uptime_ms: u64,
    /// The VMM's process id.
    pub pid: u32,
    /// Why the VM exited, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_reason: Option<String>,
}

/// A reply to one request. On the wire: `ok` first, then the [`StatusReply`] fields
/// (`{"ok":true,"state":...}`) or the error (`{"ok":false,"error":"..."}`); readers ignore
/// fields they do not know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "WireReply", try_from = "WireReply")]
pub enum Reply {
    /// The request was carried out; the VM's state after it.
    Ok(StatusReply),
    /// The request failed.
    Error(String),
}

/// The wire form of [`Reply`]: serde cannot tag an enum by a boolean, so `ok` is a field
/// beside the flattened status or the error.
#[derive(Debug, Serialize, Deserialize)]
struct WireReply {
    ok: bool,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    status: Option<StatusReply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl From<Reply> for WireReply {
    fn from(r: Reply) -> WireReply {
        match r {
            Reply::Ok(s) => WireReply {
                ok: true,
                status: Some(s),
                error: None,
            },
            Reply::Error(e) => WireReply {
                ok: false,
                status: None,
                error: Some(e),
            },
        }
    }
}

/// A reply line with `ok` but without what `ok` promises (the status or the error).
#[derive(Debug, thiserror::Error)]
#[error("neither status nor error")]
struct IncompleteReply;

impl TryFrom<WireReply> for Reply {
    type Error = IncompleteReply;

    fn try_from(w: WireReply) -> Result<Reply, IncompleteReply> {
        match (w.ok, w.status, w.error) {
            (true, Some(s), _) => Ok(Reply::Ok(s)),
            (false, _, Some(e)) => Ok(Reply::Error(e)),
            _ => Err(IncompleteReply),
        }
    }
}

impl Reply {
    /// The reply as one JSON line (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{\"ok\":false}"))
    }

    /// Parses one reply line.
    pub fn parse(line: &str) -> Result<Reply, VmmError> {
        serde_json::from_str(line.trim()).map_err(|e| VmmError::Control(format!("bad reply: {e}")))
    }

    pub(crate) fn error(e: &VmmError) -> Reply {
        Reply::Error(e.to_string())
    }
}

/// A request line longer than [`MAX_REQUEST_LINE`] bytes (newline excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong;

/// Splits the bytes a control client sends into request lines of at most
/// [`MAX_REQUEST_LINE`] bytes, however the stream is cut into reads.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no newline (so each byte is scanned once).
    scanned: usize,
}

impl LineBuffer {
    /// Appends bytes read from the client.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next complete line (with its newline); `None` until one is complete.
    /// A line longer than [`MAX_REQUEST_LINE`] is an error whether or not its newline
    /// has arrived yet.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, LineTooLong> {
        let from = self.scanned;
        let newline = self
            .buf
            .get(from..)
            .unwrap_or_default()
            .iter()
            .position(|b| *b == b'\n');
        match newline.map(|i| i + from) {
            Some(i) if i > MAX_REQUEST_LINE => Err(LineTooLong),
            Some(i) => {
                self.scanned = 0;
                Ok(Some(self.buf.drain(..=i).collect()))
            }
            None if self.buf.len() > MAX_REQUEST_LINE => Err(LineTooLong),
            None => {
                self.scanned = self.buf.len();
                Ok(None)
            }
        }
    }
}

/// Longest reply line a control client accepts (bytes, newline excluded).
pub const MAX_REPLY_LINE: usize = 64 * 1024;

/// Reads one reply line of at most [`MAX_REPLY_LINE`] bytes (without the newline): a
/// VMM that sends more, or closes the connection first, is an error.
pub fn read_reply_line(reader: &mut impl BufRead) -> Result<String, VmmError> {
    let mut line = String::new();
    reader
        .take(MAX_REPLY_LINE as u64 + 1)
        .read_line(&mut line)
        .map_err(VmmError::io("control socket read"))?;
    if line.is_empty() {
        return Err(VmmError::Control("connection closed".into()));
    }
    if !line.ends_with('\n') {
        return Err(VmmError::Control(format!(
            "reply longer than {MAX_REPLY_LINE} bytes or cut short"
        )));
    }
    Ok(line.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use std::io::BufReader;

    use super::*;

    #[test]
    fn requests_parse_as_text_or_json() {
        assert_eq!(parse_request("status\n").ok(), Some(Request::Status));
        assert_eq!(parse_request("  PAUSE ").ok(), Some(Request::Pause));
        assert_eq!(
            parse_request("{\"command\": \"resume\"}").ok(),
            Some(Request::Resume)
        );
        assert_eq!(
            parse_request(&Request::Kill.to_line()).ok(),
            Some(Request::Kill)
        );
        // The old string search took the first quoted word after "command" anywhere.
        for bad in [
            "{\"cmd\":\"x\"}",
            "{\"command\":\"status\",\"x\":1}",
            "{\"x\":\"\\\"command\\\": \\\"kill\\\"\"}",
            "{\"command\":\"reboot\"}",
            "{\"command\":",
            "",
            "stat us",
        ] {
            assert!(
                matches!(parse_request(bad), Err(VmmError::Control(_))),
                "{bad:?} parsed"
            );
        }
    }

    #[test]
    fn replies_round_trip_in_the_wire_format() {
        let ok = Reply::Ok(StatusReply {
            state: RunState::Paused,
            vcpus: 2,
            uptime_ms: 12,
            pid: 42,
            exit_reason: None,
        });
        let line = ok.to_line();
        assert_eq!(
            line,
            "{\"ok\":true,\"state\":\"paused\",\"vcpus\":2,\"uptime_ms\":12,\"pid\":42}"
        );
        assert_eq!(Reply::parse(&line).ok(), Some(ok));
        let err = Reply::Error("no \"such\"\n".into());
        assert_eq!(
            err.to_line(),
            "{\"ok\":false,\"error\":\"no \\\"such\\\"\\n\"}"
        );
        assert_eq!(Reply::parse(&err.to_line()).ok(), Some(err));
        assert!(Reply::parse("{\"ok\":true}").is_err());
    }

    #[test]
    fn bare_words_are_the_wire_command_names() {
        for r in Request::ALL {
            assert_eq!(parse_request(r.as_str()).ok(), Some(r));
            assert_eq!(parse_request(&r.as_str().to_uppercase()).ok(), Some(r));
            assert_eq!(r.to_line(), format!("{{\"command\":\"{}\"}}", r.as_str()));
        }
    }

    #[test]
    fn replies_are_serde_values_in_the_wire_form() {
        let err = Reply::Error("x".into());
        let v = serde_json::to_value(&err).expect("serialize");
        assert_eq!(v, serde_json::json!({"ok": false, "error": "x"}));
        assert_eq!(serde_json::from_value::<Reply>(v).ok(), Some(err));
        let incomplete = serde_json::json!({"ok": false, "state": "running"});
        let e = serde_json::from_value::<Reply>(incomplete).expect_err("no error field");
        assert!(e.to_string().contains("neither status nor error"), "{e}");
    }

    #[test]
    fn reply_lines_are_bounded() {
        let ok = b"{\"ok\":false,\"error\":\"x\"}\nrest".to_vec();
        let mut r = std::io::Cursor::new(ok);
        assert_eq!(
            read_reply_line(&mut r).ok().as_deref(),
            Some("{\"ok\":false,\"error\":\"x\"}")
        );
        // An endless reply: refused after MAX_REPLY_LINE bytes, not read to the end.
        let mut endless = std::io::repeat(b'a').take(1 << 30);
        let mut r = BufReader::new(&mut endless);
        assert!(matches!(read_reply_line(&mut r), Err(VmmError::Control(_))));
        assert!(endless.limit() > (1 << 30) - 2 * MAX_REPLY_LINE as u64);
        let mut r = std::io::Cursor::new(b"{\"ok\":true".to_vec());
        assert!(matches!(read_reply_line(&mut r), Err(VmmError::Control(_))));
        let mut r = std::io::Cursor::new(Vec::new());
        assert!(matches!(read_reply_line(&mut r), Err(VmmError::Control(_))));
    }

    #[test]
    fn request_lines_over_the_cap_are_refused_however_they_are_cut() {
        let mut b = LineBuffer::default();
        b.push(b"status\npause\nres");
        assert_eq!(b.next_line(), Ok(Some(b"status\n".to_vec())));
        assert_eq!(b.next_line(), Ok(Some(b"pause\n".to_vec())));
        assert_eq!(b.next_line(), Ok(None));
        // Exactly the cap (newline excluded) is a line.
        let mut b = LineBuffer::default();
        b.push(&vec![b'a'; MAX_REQUEST_LINE]);
        assert_eq!(b.next_line(), Ok(None));
        b.push(b"\n");
        assert_eq!(
            b.next_line().map(|l| l.map(|l| l.len())),
            Ok(Some(MAX_REQUEST_LINE + 1))
        );
        // The cap in one read, the rest and the newline in the next: still too long.
        let mut b = LineBuffer::default();
        b.push(&vec![b'a'; MAX_REQUEST_LINE]);
        assert_eq!(b.next_line(), Ok(None));
        b.push(b"aaaa\n");
        assert_eq!(b.next_line(), Err(LineTooLong));
        // Without a newline: refused as soon as the cap is passed.
        let mut b = LineBuffer::default();
        b.push(&vec![b'a'; MAX_REQUEST_LINE + 1]);
        assert_eq!(b.next_line(), Err(LineTooLong));
    }
}
