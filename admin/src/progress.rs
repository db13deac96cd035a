//! Progress on stderr for long operations (indicatif): bars for transfers
//! whose size is known, spinners with the elapsed time for calls that run on
//! a node. Hidden for `--output json` and when stderr is not a terminal.

use indicatif::{ProgressBar, ProgressStyle};
use mailvault_node::backups::offsite::Progress;

use crate::output::Output;

/// indicatif bars on stderr (hidden when it is not a terminal, and for
/// `--output json`).
pub struct Bars {
    bar: std::sync::Mutex<Option<ProgressBar>>,
    shown: bool,
}

impl Progress for Bars {
    fn begin(&self, step: &str, total: u64) {
        if !self.shown {
            return;
        }
        let bar = match total {
            0 => ProgressBar::new_spinner(),
            t => ProgressBar::new(t),
        };
        let template = match total {
            0 => "{spinner} {msg} {elapsed}",
            _ => "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(step.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        *self.bar.lock().expect("bar lock") = Some(bar);
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = &*self.bar.lock().expect("bar lock") {
            b.inc(bytes);
        }
    }

    fn end(&self) {
        if let Some(b) = self.bar.lock().expect("bar lock").take() {
            b.finish_and_clear();
        }
    }
}

impl Bars {
    /// Bars that are drawn only if `shown`.
    pub fn new(shown: bool) -> Bars {
        Bars {
            bar: Default::default(),
            shown,
        }
    }
}

/// A spinner with the elapsed time on stderr while a long call runs on a
/// node (a ship, a drill, a mailbox restore); hidden for `--output json`
/// and when stderr is not a terminal.
pub struct Spinner(Option<ProgressBar>);

impl Spinner {
    /// Starts one saying `what`.
    pub fn start(output: Output, what: &str) -> Spinner {
        if output != Output::Text {
            return Spinner(None);
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            bar.set_style(style);
        }
        bar.set_message(what.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Spinner(Some(bar))
    }

    /// Clears it.
    pub fn stop(self) {
        if let Some(b) = self.0 {
            b.finish_and_clear();
        }
    }
}

/// Awaits `call` with a spinner saying `what` (see [`Spinner`]).
pub async fn with_spinner<T>(output: Output, what: &str, call: impl std::future::Future<Output = T>) -> T {
    let spinner = Spinner::start(output, what);
    let out = call.await;
    spinner.stop();
    out
}
