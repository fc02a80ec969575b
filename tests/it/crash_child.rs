//! The crash harness shared by the `*_crash` tests: a parent test runs this test binary again on
//! an ignored child test (named exactly, with its inputs in environment variables), reads the
//! lines the child prints as it acknowledges work, SIGKILLs it at a chosen line and reads the
//! lines the pipe still holds (all printed before death).
//!
//! The child side is [`child_env`] (its input, plus a watchdog that exits when the parent dies)
//! and [`emit`] (one flushed line per acknowledgement).

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the parent waits for the child's next line before failing the test instead of
/// hanging it.
const LINE_TIMEOUT: Duration = Duration::from_secs(120);

/// The crash seed: `env` if set (to replay a failing run), otherwise fresh from the clock. Odd,
/// so an [`Rng`] on it never sticks at zero.
pub(crate) fn seed(env: &str) -> u64 {
    std::env::var(env)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| crate::support::now_micros() | 1)
}

/// A small xorshift generator: kill points vary between runs, and the seed is in every failure
/// message so a failing run can be replayed.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A running child: this test binary on one ignored test.
pub(crate) struct CrashChild {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Option<JoinHandle<String>>,
    killed: bool,
}

/// How a child ended.
pub(crate) struct Finished {
    /// Whether the parent killed it.
    pub(crate) killed: bool,
    pub(crate) status: ExitStatus,
    /// Everything it wrote to stderr.
    pub(crate) stderr: String,
}

impl Finished {
    /// Fails the test unless the parent killed the child; `progress` says how far the child
    /// got, for the failure message.
    pub(crate) fn assert_killed(&self, context: &str, progress: &str) {
        let Self { status, stderr, .. } = self;
        assert!(
            self.killed,
            "{context}: the child exited after {progress} ({status}):\n{stderr}"
        );
    }
}

impl CrashChild {
    /// Runs the ignored test `test` (exactly, one thread, output not captured) with `envs` set;
    /// its stdin is a pipe the child watches (see [`child_env`]).
    pub(crate) fn spawn<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        test: &str,
        envs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args([test, "--exact", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .envs(envs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                if send.send(line.unwrap()).is_err() {
                    return;
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Self {
            child,
            lines,
            stderr: Some(stderr),
            killed: false,
        }
    }

    /// The child's next stdout line, or `None` once its stdout is closed. Fails the test if no
    /// line comes within [`LINE_TIMEOUT`].
    pub(crate) fn next_line(&mut self) -> Option<String> {
        match self.lines.recv_timeout(LINE_TIMEOUT) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                panic!("the crash child printed nothing for {LINE_TIMEOUT:?}")
            }
        }
    }

    /// SIGKILLs the child: no destructors, no shutdown, no flush.
    pub(crate) fn kill(&mut self) {
        self.child.kill().unwrap();
        self.killed = true;
    }

    /// Feeds every stdout line to `on_line`, kills the child the first time it returns `true`,
    /// and reads on to the end: the lines still in the pipe after the kill were printed before
    /// the death, so they count too. Then waits for the child.
    pub(crate) fn run(mut self, mut on_line: impl FnMut(&str) -> bool) -> Finished {
        while let Some(line) = self.next_line() {
            if on_line(&line) && !self.killed {
                self.kill();
            }
        }
        self.finish()
    }

    /// Waits for the child to end.
    pub(crate) fn finish(mut self) -> Finished {
        let status = self.child.wait().unwrap();
        let stderr = self.stderr.take().unwrap().join().unwrap();
        Finished {
            killed: self.killed,
            status,
            stderr,
        }
    }
}

impl Drop for CrashChild {
    /// A test that fails half-way does not leave its child running.
    fn drop(&mut self) {
        if self.stderr.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// In a child test: the value of `env`, which only a crash parent sets (`None` in a normal test
/// run, where the child test then does nothing). In a child, also starts the watchdog: if the
/// parent dies, stdin closes, and the child exits rather than outlive it.
pub(crate) fn child_env(env: &str) -> Option<OsString> {
    let value = std::env::var_os(env)?;
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(3);
    });
    Some(value)
}

/// In a child test: prints one line to stdout and flushes it, so the parent reads it even if the
/// child is killed right after.
pub(crate) fn emit(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}
