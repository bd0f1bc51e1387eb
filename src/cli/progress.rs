//! Progress bars that also work off a terminal. indicatif draws nothing when stderr is not a terminal (output to a
//! file, `tee`, CI), so there each bar prints its rendered line as a plain line at most every
//! `DEJAVU_PROGRESS_SECS` seconds (default 30; 0 prints every update), and its last state when it ends.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// Seconds between plain progress lines when stderr is not a terminal.
pub const PROGRESS_SECS_ENV: &str = "DEJAVU_PROGRESS_SECS";

/// A bar of `len` steps drawn with indicatif's `template` on a terminal, as plain periodic lines elsewhere.
pub fn bar(len: u64, template: &str) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        let every = std::env::var(PROGRESS_SECS_ENV).ok().and_then(|s| s.parse::<f64>().ok()).filter(|s| s.is_finite() && *s >= 0.0);
        let every = every.unwrap_or(30.0);
        // indicatif redraws at most `hz` times a second; the lines themselves are throttled to `every`.
        let hz = if every < 1.0 { 20 } else { 1 };
        ProgressDrawTarget::term_like_with_hz(Box::new(PlainLines::new(Duration::from_secs_f64(every))), hz)
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar
}

/// A `TermLike` that turns indicatif's redraws into plain lines on stderr, throttled.
#[derive(Debug)]
struct PlainLines {
    every: Duration,
    state: Mutex<Lines>,
}

#[derive(Debug)]
struct Lines {
    /// What the current redraw has written so far.
    pending: String,
    /// The last non-empty state, and whether it was printed.
    last: String,
    last_printed: bool,
    printed_at: Option<Instant>,
}

impl PlainLines {
    fn new(every: Duration) -> Self {
        PlainLines { every, state: Mutex::new(Lines { pending: String::new(), last: String::new(), last_printed: true, printed_at: None }) }
    }
}

fn emit(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{line}");
}

impl TermLike for PlainLines {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _n: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _n: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _n: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _n: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        if let Ok(mut st) = self.state.lock() {
            st.pending.push_str(s.trim_start_matches('\r'));
        }
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let Ok(mut st) = self.state.lock() else { return Ok(()) };
        let line = std::mem::take(&mut st.pending).trim_end().to_string();
        if line.is_empty() || line == st.last {
            return Ok(());
        }
        let due = st.printed_at.is_none_or(|t| t.elapsed() >= self.every);
        st.last = line;
        st.last_printed = due;
        if due {
            emit(&st.last);
            st.printed_at = Some(Instant::now());
        }
        Ok(())
    }
}

impl Drop for PlainLines {
    fn drop(&mut self) {
        if let Ok(st) = self.state.lock() {
            if !st.last_printed && !st.last.is_empty() {
                emit(&st.last);
            }
        }
    }
}
