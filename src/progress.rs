//! Transfer progress on stderr: indicatif bars on a terminal, one plain line per finished
//! blob otherwise, nothing with `--quiet`. Safe to use from the parallel transfer threads.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use oci_spec::image::Descriptor;

pub enum Progress {
    Silent,
    Lines,
    Bars(MultiProgress),
}

impl Progress {
    /// Bars when stderr is a terminal, plain lines when it is not, nothing when `quiet`.
    pub fn for_stderr(quiet: bool) -> Progress {
        if quiet {
            Progress::Silent
        } else if std::io::stderr().is_terminal() {
            Progress::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        } else {
            Progress::Lines
        }
    }

    /// The progress of one blob's transfer.
    pub fn blob(&self, desc: &Descriptor) -> BlobProgress {
        let label = short_digest(desc);
        let bar = match self {
            Progress::Bars(multi) => {
                let bar = multi.add(ProgressBar::new(desc.size()));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                );
                bar.set_prefix(label.clone());
                Some(bar)
            }
            _ => None,
        };
        BlobProgress {
            bar,
            line: matches!(self, Progress::Lines).then_some(label),
            size: desc.size(),
            finished: AtomicBool::new(false),
        }
    }
}

fn short_digest(desc: &Descriptor) -> String {
    let d = desc.digest().digest();
    format!("blob {}", &d[..d.len().min(12)])
}

pub struct BlobProgress {
    bar: Option<ProgressBar>,
    line: Option<String>,
    size: u64,
    finished: AtomicBool,
}

impl BlobProgress {
    /// A progress that shows nothing.
    pub fn hidden() -> BlobProgress {
        BlobProgress {
            bar: None,
            line: None,
            size: 0,
            finished: AtomicBool::new(false),
        }
    }

    pub fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    /// A transfer starts over (a retry).
    pub fn restart(&self) {
        if let Some(bar) = &self.bar {
            bar.set_position(0);
        }
    }

    /// Done: `how` says what happened ("copied", "exists", "mounted").
    pub fn finish_as(&self, how: &str) {
        if self.finished.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Some(bar) = &self.bar {
            bar.set_position(self.size);
            bar.finish_with_message(how.to_string());
        }
        if let Some(label) = &self.line {
            eprintln!("{label}: {how} ({} bytes)", self.size);
        }
    }

    pub fn finish(&self) {
        self.finish_as("done");
    }
}

/// Counts what passes through a reader into a [`BlobProgress`].
pub struct ProgressReader<'a, R> {
    inner: R,
    progress: &'a BlobProgress,
}

impl<'a, R> ProgressReader<'a, R> {
    pub fn new(inner: R, progress: &'a BlobProgress) -> Self {
        ProgressReader { inner, progress }
    }
}

impl<R: std::io::Read> std::io::Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}
