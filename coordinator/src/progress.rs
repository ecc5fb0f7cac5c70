//! Progress bars on stderr for long operations (convert, init, loading).

use grok_shared::checkpoint::convert::ConvertProgress;
use indicatif::{ProgressBar, ProgressStyle};

pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    pub fn new(what: &str) -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(what.to_string());
        Bar { bar }
    }

    pub fn update(&mut self, p: &ConvertProgress) {
        self.bar.set_length(p.bytes_total);
        self.bar.set_position(p.bytes_done);
        self.bar.set_message(p.tensor.clone());
    }

    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}

/// One line summing up what a convert or init wrote.
pub fn summary(r: &grok_shared::checkpoint::convert::ConvertReport) -> String {
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    format!(
        "wrote {} tensors, {:.1} MB in {} file(s) to {} in {:.1} s ({:.0} MB/s)",
        r.tensors,
        r.bytes as f64 / 1e6,
        r.files.len(),
        r.out_dir.display(),
        secs,
        r.bytes as f64 / 1e6 / secs
    )
}
