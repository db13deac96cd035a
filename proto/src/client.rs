//! Client-side helpers over the `mailvault.v1` API, shared by the admin CLI,
//! its benchmark and the test harness: the framing of a streamed append, the
//! paged listing loop, reading a streamed message, and scraping a node's
//! `/metrics` (plain HTTP on its ops port).

use std::time::Duration;

use tonic::transport::Channel;
use tonic::Status;

use crate::v1::append_message_request::Frame;
use crate::v1::get_message_response::Frame as GetFrame;
use crate::v1::mailbox_client::MailboxClient;
use crate::v1::{AppendHeader, AppendMessageRequest, GetMessageRequest, ListMessagesRequest, MessageSummary};

/// Bytes per frame when streaming a message in.
pub const FRAME_BYTES: usize = 256 * 1024;

/// The frames of an append: the header, then the body in [`FRAME_BYTES`] chunks.
pub fn append_frames(header: AppendHeader, body: &[u8]) -> Vec<AppendMessageRequest> {
    let mut frames = vec![AppendMessageRequest {
        frame: Some(Frame::Header(header)),
    }];
    frames.extend(body.chunks(FRAME_BYTES).map(|c| AppendMessageRequest {
        frame: Some(Frame::Chunk(c.to_vec())),
    }));
    frames
}

/// Every summary `request` selects, following the page tokens from its own
/// (`page_size` 0 is taken as 1000).
pub async fn list_all(
    c: &mut MailboxClient<Channel>,
    mut request: ListMessagesRequest,
) -> Result<Vec<MessageSummary>, Status> {
    if request.page_size == 0 {
        request.page_size = 1000;
    }
    let mut all = Vec::new();
    loop {
        let r = c.list_messages(request.clone()).await?.into_inner();
        all.extend(r.messages);
        if r.next_page_token.is_empty() {
            return Ok(all);
        }
        request.page_token = r.next_page_token;
    }
}

/// A message's summary (its metadata frame, if the server sent one) and raw bytes.
pub async fn read_message(
    c: &mut MailboxClient<Channel>,
    request: GetMessageRequest,
) -> Result<(Option<MessageSummary>, Vec<u8>), Status> {
    let mut s = c.get_message(request).await?.into_inner();
    let mut meta = None;
    let mut body = Vec::new();
    while let Some(f) = s.message().await? {
        match f.frame {
            Some(GetFrame::Metadata(m)) => meta = Some(m),
            Some(GetFrame::Chunk(b)) => body.extend_from_slice(&b),
            None => {}
        }
    }
    Ok((meta, body))
}

/// The whole `/metrics` page of the node whose ops listener is `ops_addr`,
/// or `None` if it cannot be read within `timeout` (for each of connect and read).
pub async fn scrape_metrics(ops_addr: &str, timeout: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(ops_addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {ops_addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut body = String::new();
    tokio::time::timeout(timeout, s.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    Some(body)
}

/// One unlabelled counter or gauge of a `/metrics` page (the first series of
/// that name); 0 when it is not there (not yet recorded).
pub fn metric_value(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_append_is_a_header_then_bounded_chunks() {
        let body = vec![7u8; FRAME_BYTES * 2 + 1];
        let frames = append_frames(AppendHeader::default(), &body);
        assert_eq!(frames.len(), 4);
        assert!(matches!(frames[0].frame, Some(Frame::Header(_))));
        let sizes: Vec<usize> = frames[1..]
            .iter()
            .map(|f| match &f.frame {
                Some(Frame::Chunk(c)) => c.len(),
                _ => panic!("not a chunk"),
            })
            .collect();
        assert_eq!(sizes, [FRAME_BYTES, FRAME_BYTES, 1]);
        assert_eq!(append_frames(AppendHeader::default(), &[]).len(), 1);
    }

    #[test]
    fn a_metric_is_read_by_its_exact_name() {
        let page = "# TYPE mailvault_fsyncs_total counter\nmailvault_fsyncs_total_x 9\nmailvault_fsyncs_total 42\nmailvault_lag{node=\"1\"} 3\n";
        assert_eq!(metric_value(page, "mailvault_fsyncs_total"), 42.0);
        assert_eq!(metric_value(page, "mailvault_lag"), 3.0);
        assert_eq!(metric_value(page, "mailvault_absent"), 0.0);
    }
}
