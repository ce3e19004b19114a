//! A progress bar on a terminal for long operations (mkfs, fsck of large devices).

use std::io::IsTerminal;

pub struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    /// A bar shown only when stderr is a terminal and the job is large.
    pub fn new(what: &str, large: bool) -> Bar {
        if !large || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_prefix(what.to_string());
        Bar(Some(b))
    }

    pub fn set(&mut self, done: u64, total: u64) {
        if let Some(b) = &self.0 {
            b.set_length(total);
            b.set_position(done);
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.0.take() {
            b.finish_and_clear();
        }
    }
}
