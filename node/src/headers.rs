//! Parsing the header section of a message with mail-parser.

use crate::state::records::HeaderSummary;

/// Bytes of the message start that are parsed for headers.
pub const HEADER_SCAN_BYTES: usize = 256 * 1024;

/// Subject, first From address, To addresses and Date of a raw message.
pub fn summarize(raw_start: &[u8]) -> HeaderSummary {
    let Some(msg) = mail_parser::MessageParser::default().parse_headers(raw_start) else {
        return HeaderSummary::default();
    };
    let addr = |a: &mail_parser::Addr<'_>| a.address().unwrap_or_default().to_string();
    HeaderSummary {
        subject: msg.subject().unwrap_or_default().to_string(),
        from: msg.from().and_then(|a| a.first()).map(addr).unwrap_or_default(),
        to: msg.to().map(|a| a.iter().map(addr).collect()).unwrap_or_default(),
        date: msg.date().map(|d| d.to_rfc3339()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_parsed_from_a_raw_message() {
        let raw = b"From: Ann <ann@example.com>\r\nTo: a@x.org, b@y.org\r\nSubject: =?utf-8?q?Caf=C3=A9?=\r\nDate: Mon, 2 Nov 2026 10:00:00 +0000\r\n\r\nbody";
        let h = summarize(raw);
        assert_eq!(h.subject, "Caf\u{e9}");
        assert_eq!(h.from, "ann@example.com");
        assert_eq!(h.to, vec!["a@x.org", "b@y.org"]);
        assert!(h.date.starts_with("2026-11-02T10:00:00"), "{}", h.date);
    }

    #[test]
    fn garbage_gives_empty_headers() {
        assert_eq!(summarize(b"").subject, "");
    }
}
