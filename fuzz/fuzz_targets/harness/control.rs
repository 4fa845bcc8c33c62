//! VMM control protocol: request parsing, reply parsing, the bounded reply reader and the
//! server's request framing. Any bytes must give a value or an error, never a panic; what
//! parses must round-trip; no reply line over `MAX_REPLY_LINE` is returned; and the framing
//! hands out exactly the newline-terminated lines of at most `MAX_REQUEST_LINE` bytes,
//! refusing a longer one however the stream is cut into reads.
use std::io::Cursor;

use stead_vmm::{
    LineBuffer, MAX_REPLY_LINE, MAX_REQUEST_LINE, Reply, parse_request, read_reply_line,
};

fn parse_round_trips(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let req = parse_request(text).ok();
    if let Some(req) = req {
        assert_eq!(parse_request(&req.to_line()).ok(), Some(req));
    }
    if let Ok(reply) = Reply::parse(text) {
        assert_eq!(Reply::parse(&reply.to_line()).ok(), Some(reply));
    }
    req.is_some()
}

fn reply_reader_is_bounded(data: &[u8]) {
    let mut r = Cursor::new(data);
    while let Ok(line) = read_reply_line(&mut r) {
        assert!(
            line.len() <= MAX_REPLY_LINE,
            "reply line of {} bytes",
            line.len()
        );
    }
}

/// What the framing must give for `stream`: its complete lines, and whether a line (complete
/// or not) longer than the cap comes before the stream ends.
fn expected_lines(stream: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut lines = Vec::new();
    for seg in stream.split_inclusive(|b| *b == b'\n') {
        let complete = seg.ends_with(b"\n");
        if seg.len() - usize::from(complete) > MAX_REQUEST_LINE {
            return (lines, true);
        }
        if complete {
            lines.push(seg);
        }
    }
    (lines, false)
}

/// Feeds `reps` KiB of filler (0 to 79 KiB, so the first line can end on either side of the
/// 64 KiB cap) followed by `body` to a [`LineBuffer`], in reads of a size chosen by `read`.
fn framing_matches_the_model(reps: u8, read: u8, body: &[u8]) {
    let mut stream = vec![b'x'; usize::from(reps % 80) * 1024];
    stream.extend_from_slice(body);
    // 512 B to 8 KiB per read (the server reads 4 KiB): enough to cut a line anywhere
    // relative to the cap without making each run scan the buffer a thousand times.
    let read = (usize::from(read % 16) + 1) * 512;
    let mut lb = LineBuffer::default();
    let mut got = Vec::new();
    let mut refused = false;
    'reads: for chunk in stream.chunks(read) {
        lb.push(chunk);
        loop {
            match lb.next_line() {
                Ok(Some(line)) => got.push(line),
                Ok(None) => break,
                Err(_) => {
                    refused = true;
                    break 'reads;
                }
            }
        }
    }
    let (want, want_refused) = expected_lines(&stream);
    assert_eq!(refused, want_refused, "over-long line refused");
    assert!(
        got.iter().map(Vec::as_slice).eq(want),
        "lines differ from the model"
    );
}

/// One fuzz input; panics on a broken property. Returns whether it parsed as a request.
pub fn run(data: &[u8]) -> bool {
    let parsed = parse_round_trips(data);
    reply_reader_is_bounded(data);
    if let [reps, read, body @ ..] = data {
        framing_matches_the_model(*reps, *read, body);
    }
    parsed
}
