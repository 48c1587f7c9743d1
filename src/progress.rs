//! Progress on stderr. [`Progress`]: transfers, an indicatif bar per blob on a terminal, one
//! plain line per finished blob otherwise, nothing with `--quiet`. [`ByteProgress`]: one
//! operation counted in bytes (an unpack), with [`TerminalProgress`] drawing it as a bar on a
//! terminal. Both are safe to use from worker threads.

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

/// Receives the progress of one long operation counted in bytes (an unpack); called from
/// worker threads too.
pub trait ByteProgress: Sync {
    /// The work ahead, in bytes.
    fn start(&self, total_bytes: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
    /// The operation ended (well or not).
    fn finish(&self);
}

/// Reports nothing.
pub struct NoProgress;

impl ByteProgress for NoProgress {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// A byte-count progress bar on stderr, shown only when stderr is a terminal.
pub struct TerminalProgress {
    bar: Option<indicatif::ProgressBar>,
}

impl TerminalProgress {
    pub fn new(label: &str, quiet: bool) -> Self {
        let shown = !quiet && std::io::stderr().is_terminal();
        let bar = shown.then(|| {
            let bar = indicatif::ProgressBar::hidden();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .expect("the template is valid")
                .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar
        });
        TerminalProgress { bar }
    }
}

impl ByteProgress for TerminalProgress {
    fn start(&self, total_bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total_bytes);
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
