//! Masking of customer addresses for principals without `ViewAddresses`.

/// Masks an address for principals without `ViewAddresses`: `t***@example.com`.
pub fn mask_address(addr: &str) -> String {
    match addr.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None if addr.is_empty() => String::new(),
        None => "***".to_string(),
    }
}

fn local_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._%+-=".contains(&b)
}

fn domain_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b".-".contains(&b)
}

/// Masks every e-mail address in raw message bytes (headers and body) the way
/// [`mask_address`] does, for principals without `ViewAddresses`.
pub fn mask_addresses_in(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    let mut copied = 0;
    while i < raw.len() {
        if raw[i] != b'@' {
            i += 1;
            continue;
        }
        let mut start = i;
        while start > copied && local_char(raw[start - 1]) {
            start -= 1;
        }
        let mut end = i + 1;
        while end < raw.len() && domain_char(raw[end]) {
            end += 1;
        }
        let domain = &raw[i + 1..end];
        if start < i && domain.contains(&b'.') {
            out.extend_from_slice(&raw[copied..start + 1]);
            out.extend_from_slice(b"***");
            copied = i;
        }
        i = end;
    }
    out.extend_from_slice(&raw[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking() {
        assert_eq!(mask_address("tom@example.com"), "t***@example.com");
        assert_eq!(mask_address(""), "");
        let raw = b"From: Jane <jane.doe@example.org>\r\n\r\nmail bob@x.io, not @handle or a@b";
        let masked = String::from_utf8(mask_addresses_in(raw)).unwrap();
        assert_eq!(
            masked,
            "From: Jane <j***@example.org>\r\n\r\nmail b***@x.io, not @handle or a@b"
        );
    }
}
