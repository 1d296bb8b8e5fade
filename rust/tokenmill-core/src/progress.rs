//! The one progress line on stderr (`\r`-updated, at most ten times a second), for BPE training and
//! corpus preparation.

use std::io::Write;
use std::time::{Duration, Instant};

pub struct Progress {
    label: &'static str,
    unit: &'static str,
    total: Option<u64>,
    enabled: bool,
    start: Instant,
    last: Option<Instant>,
}

impl Progress {
    pub fn new(label: &'static str, unit: &'static str, total: Option<u64>, enabled: bool) -> Self {
        Progress {
            label,
            unit,
            total,
            enabled,
            start: Instant::now(),
            last: None,
        }
    }

    pub fn update(&mut self, done: u64) {
        self.update_with(done, |_| String::new());
    }

    /// `update` with more text after the line; `detail` gets the seconds since the start and is
    /// only called when the line is drawn.
    pub fn update_with(&mut self, done: u64, detail: impl FnOnce(f64) -> String) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now - t < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(now);
        self.draw(done, detail);
    }

    /// Draw the final state and end the line.
    pub fn finish(&mut self, done: u64) {
        self.finish_with(done, |_| String::new());
    }

    pub fn finish_with(&mut self, done: u64, detail: impl FnOnce(f64) -> String) {
        if self.enabled {
            self.draw(done, detail);
            eprintln!();
        }
    }

    fn draw(&self, done: u64, detail: impl FnOnce(f64) -> String) {
        let secs = self.start.elapsed().as_secs_f64();
        let (done_s, total_s) = match self.unit {
            "B" => (human(done), self.total.map(human)),
            _ => (done.to_string(), self.total.map(|t| t.to_string())),
        };
        let line = match (self.total, total_s) {
            (Some(t), Some(ts)) if t > 0 => format!(
                "{}: {:>3}% {}/{} [{:.1}s]",
                self.label,
                (done.min(t) * 100) / t,
                done_s,
                ts,
                secs
            ),
            _ => format!("{}: {} [{:.1}s]", self.label, done_s, secs),
        };
        let detail = detail(secs.max(1e-9));
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line}{detail}\x1b[K");
        let _ = err.flush();
    }
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b < 1 << 20 => format!("{:.1} KiB", b as f64 / 1024.0),
        b if b < 1 << 30 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
    }
}
