//! Housekeeping, on the leader: uploads staged chunk by chunk whose final
//! `Append` never came (their leader died mid-upload; the client gave up)
//! are expired once idle for `limits.staged_expiry_secs`.
//!
//! The leader proposes `Command::ExpireStaged` with its clock; the state
//! machine marks every upload not yet marked idle and removes the chunks of
//! those idle long enough, so every replica expires the same uploads at the
//! same log index. A chunk staged meanwhile makes its upload active again.
//! Every node shows what it holds staged: `mailvault_staged_uploads`,
//! `mailvault_staged_chunks`, `mailvault_staged_bytes`.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::now_ms;
use crate::ctx::Ctx;
use crate::state::command::{Command, CommandResult};

/// How often to look: a tenth of the expiry, between 1 s and a minute (an
/// upload is expired at most that much later than its expiry).
pub fn sweep_every(expiry: Duration) -> Duration {
    (expiry / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Runs until the node stops.
pub async fn run(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let expiry = Duration::from_secs(ctx.config.limits.staged_expiry_secs);
    let expiry_ms = i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(sweep_every(expiry));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let uploads = match ctx.reader.staged_uploads() {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the staged uploads; retried");
                continue;
            }
        };
        metrics::gauge!("mailvault_staged_uploads").set(uploads.len() as f64);
        metrics::gauge!("mailvault_staged_chunks").set(uploads.iter().map(|u| u.chunks).sum::<u64>() as f64);
        metrics::gauge!("mailvault_staged_bytes").set(uploads.iter().map(|u| u.bytes).sum::<u64>() as f64);
        if !ctx.router.is_leader() {
            continue;
        }
        let now = now_ms();
        let due = uploads.iter().any(|u| match u.record.idle_since_ms {
            None => true,
            Some(since) => since <= now.saturating_sub(expiry_ms),
        });
        if !due {
            continue;
        }
        match ctx
            .proposer
            .propose(Command::ExpireStaged {
                now_ms: now,
                expiry_ms,
                node: ctx.id,
            })
            .await
        {
            Ok(CommandResult::Expired { uploads, chunks, .. }) if uploads > 0 => {
                metrics::counter!("mailvault_staged_expired_chunks_total").increment(chunks);
                tracing::info!(
                    uploads,
                    chunks,
                    idle_secs = expiry.as_secs(),
                    "expired uploads staged and never committed"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not expire staged uploads; retried"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_runs_a_tenth_of_the_expiry_within_a_second_and_a_minute() {
        assert_eq!(sweep_every(Duration::from_secs(3600)), Duration::from_secs(60));
        assert_eq!(sweep_every(Duration::from_secs(100)), Duration::from_secs(10));
        assert_eq!(sweep_every(Duration::from_secs(2)), Duration::from_secs(1));
    }
}
