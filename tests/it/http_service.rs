//! `examples/http_service.rs` driven over real HTTP on loopback: commands, typed rejections as
//! HTTP statuses, read-your-writes through `?after=<position>`, a transfer saga, a graceful
//! shutdown on SIGINT (exit 0 after `shutdown complete`) and a restart on the same data.
//!
//! The example binary is built by `cargo test` (all targets), but not by `cargo test --test it`,
//! so the test builds it first with the cargo that runs the tests (a no-op when it is fresh),
//! then runs `target/<profile>/examples/http_service`. The HTTP client is a few lines of
//! HTTP/1.1 over `std::net::TcpStream` (`Connection: close`). Every wait is bounded.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const EXAMPLE: &str = "http_service";
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
const START_TIMEOUT: Duration = Duration::from_secs(20);
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
const IO_TIMEOUT: Duration = Duration::from_secs(15);
const SAGA_TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn http_service_over_loopback_with_graceful_shutdown_and_restart() {
    let bin = example_binary();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("db");

    // --- first run ---
    let mut server = Server::start(&bin, &data);

    let (status, body) = server.post("/accounts/alice", json!({ "owner": "Alice" }));
    assert_eq!(status, 201, "open alice: {body}");
    assert_eq!(body["version"], 1, "{body}");
    let (status, body) = server.post("/accounts/bob", json!({ "owner": "Bob" }));
    assert_eq!(status, 201, "open bob: {body}");
    let (status, body) = server.post("/accounts/alice", json!({ "owner": "Mallory" }));
    assert_eq!(status, 409, "open twice: {body}");
    assert_eq!(body["rejection"], "AlreadyOpen", "{body}");

    let (status, body) = server.post("/accounts/alice/deposit", json!({ "amount": 1_000 }));
    assert_eq!(status, 200, "deposit: {body}");
    assert_eq!(body["version"], 2, "{body}");

    // A domain rejection is 409 and names the rejection, with its fields.
    let (status, body) = server.post("/accounts/alice/withdraw", json!({ "amount": 5_000 }));
    assert_eq!(status, 409, "overdraft: {body}");
    assert_eq!(body["error"], "rejected", "{body}");
    assert_eq!(body["rejection"], "InsufficientFunds", "{body}");
    assert_eq!(
        body["detail"]["InsufficientFunds"],
        json!({ "balance": 1_000, "requested": 5_000 }),
        "{body}"
    );
    // An account that was never opened is 404; a malformed body is a 4xx JSON error.
    let (status, body) = server.post("/accounts/nobody/deposit", json!({ "amount": 5 }));
    assert_eq!(status, 404, "deposit to nobody: {body}");
    assert_eq!(body["rejection"], "NotOpen", "{body}");
    let (status, body) = server.post("/accounts/alice/deposit", json!({ "amount": "lots" }));
    assert!((400..500).contains(&status), "bad body: {status} {body}");
    assert_eq!(body["error"], "bad_request", "{body}");
    let (status, body) = server.get("/accounts/nobody");
    assert_eq!(status, 404, "balance of nobody: {body}");

    // Read-your-writes: a burst of deposits, then reads right after the last one's position.
    let mut position = 0;
    for _ in 0..20 {
        let (status, body) = server.post("/accounts/alice/deposit", json!({ "amount": 10 }));
        assert_eq!(status, 200, "deposit: {body}");
        let next = body["position"].as_u64().unwrap();
        assert!(next > position, "positions grow: {next} after {position}");
        position = next;
    }
    let (status, body) = server.get(&format!("/accounts/alice?after={position}"));
    assert_eq!(status, 200, "balance after {position}: {body}");
    assert_eq!(body["balance"], 1_200, "{body}");
    assert_eq!(body["owner"], "Alice", "{body}");
    assert_eq!(body["version"], 22, "{body}");
    let (status, body) = server.get(&format!("/accounts/alice/statement?after={position}"));
    assert_eq!(status, 200, "statement: {body}");
    let lines = body["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 22, "opened + 21 deposits: {body}");
    assert_eq!(lines[0]["kind"], "opened", "{body}");
    assert_eq!(lines[21]["balance"], 1_200, "{body}");
    assert_eq!(lines[21]["position"], position, "{body}");
    // A position the service never handed out cannot be waited for.
    let (status, body) = server.get(&format!("/accounts/alice?after={}", position + 1_000));
    assert_eq!(status, 422, "future position: {body}");

    // Transfers: one completes, one fails on the withdrawal (nothing moves).
    let (status, body) = server.post(
        "/transfers/t1",
        json!({ "from": "alice", "to": "bob", "amount": 300 }),
    );
    assert_eq!(status, 202, "transfer t1: {body}");
    let (status, body) = server.post(
        "/transfers/t2",
        json!({ "from": "bob", "to": "alice", "amount": 1_000_000 }),
    );
    assert_eq!(status, 202, "transfer t2: {body}");
    let t1 = server.wait_for_transfer_end("t1");
    assert_eq!(t1["status"], "Completed", "{t1}");
    assert_eq!(t1["amount"], 300, "{t1}");
    let t2 = server.wait_for_transfer_end("t2");
    assert_eq!(t2["status"], "Failed", "{t2}");
    assert!(
        t2["reason"]
            .as_str()
            .unwrap()
            .starts_with("withdrawal rejected"),
        "{t2}"
    );
    let (status, body) = server.get("/transfers/t3");
    assert_eq!(status, 404, "unknown transfer: {body}");

    // The saga's events precede this deposit in the log, so reading after it sees them.
    let (status, body) = server.post("/accounts/bob/deposit", json!({ "amount": 1 }));
    assert_eq!(status, 200, "deposit: {body}");
    let position = body["position"].as_u64().unwrap();
    let (_, alice) = server.get(&format!("/accounts/alice?after={position}"));
    let (_, bob) = server.get(&format!("/accounts/bob?after={position}"));
    assert_eq!(alice["balance"], 900, "{alice}");
    assert_eq!(bob["balance"], 301, "{bob}");

    // SIGINT with a request in flight (its head sent, its body not yet): the server stops
    // accepting, finishes that request (committed), then closes the store and exits 0.
    let body = json!({ "amount": 1 }).to_string();
    let mut in_flight = server.begin("POST", "/accounts/bob/deposit", &body);
    std::thread::sleep(Duration::from_millis(200));
    server.signal("-INT");
    server.expect_stderr("SIGINT");
    server.expect_refused();
    in_flight.send(body.as_bytes());
    let (status, body) = in_flight.response();
    assert_eq!(status, 200, "the request in flight at the signal: {body}");
    let status = server.wait_exit("SIGINT");
    assert_eq!(status.code(), Some(0), "exit after SIGINT: {status}");
    server.expect_line("shutdown complete");

    // --- second run on the same data ---
    let mut server = Server::start(&bin, &data);
    let (status, alice) = server.get("/accounts/alice");
    assert_eq!(status, 200, "{alice}");
    assert_eq!(alice["balance"], 900, "read model survived: {alice}");
    let (_, bob) = server.get("/accounts/bob");
    assert_eq!(
        bob["balance"], 302,
        "read model survived, with the in-flight deposit: {bob}"
    );
    let (status, t1) = server.get("/transfers/t1");
    assert_eq!((status, &t1["status"]), (200, &json!("Completed")), "{t1}");
    // The aggregate itself is recovered from its events: its balance decides the rejection.
    let (status, body) = server.post("/accounts/alice/withdraw", json!({ "amount": 901 }));
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        body["detail"]["InsufficientFunds"]["balance"], 900,
        "{body}"
    );
    let (status, body) = server.post("/accounts/alice/withdraw", json!({ "amount": 900 }));
    assert_eq!(status, 200, "{body}");
    let position = body["position"].as_u64().unwrap();
    let (_, alice) = server.get(&format!("/accounts/alice?after={position}"));
    assert_eq!(alice["balance"], 0, "{alice}");

    // SIGTERM takes the same path.
    let status = server.stop("-TERM");
    assert_eq!(status.code(), Some(0), "exit after SIGTERM: {status}");
    server.expect_line("shutdown complete");
}

/// Builds the example with the cargo running this test (a no-op when fresh) and returns its path
/// beside this test binary: `target/<profile>/deps/it-*` → `target/<profile>/examples/`.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps");
    let bin = profile_dir
        .join("examples")
        .join(format!("{EXAMPLE}{}", std::env::consts::EXE_SUFFIX));
    // Only when run by cargo: its `CARGO` says which cargo, and the profile directory says where.
    if let (Ok(cargo), Some(target_dir), Some(profile)) = (
        std::env::var("CARGO"),
        profile_dir.parent(),
        profile_dir.file_name().and_then(|p| p.to_str()),
    ) {
        let profile = if profile == "debug" { "dev" } else { profile };
        let mut build = Command::new(cargo);
        build
            .args(["build", "--example", EXAMPLE, "--profile", profile])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        let (status, output) = run_bounded(build, BUILD_TIMEOUT);
        assert!(
            status.success(),
            "cannot build the {EXAMPLE} example ({status}):\n{output}"
        );
    }
    assert!(
        bin.is_file(),
        "the {EXAMPLE} example is not built at {}: run this test via `cargo test`",
        bin.display()
    );
    bin
}

/// Runs `command` to completion within `limit`, killing it after; returns its status and output.
fn run_bounded(mut command: Command, limit: Duration) -> (ExitStatus, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let status = wait_bounded(&mut child, limit).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{command:?} did not finish within {limit:?}")
    });
    let output = format!(
        "{}{}",
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default()
    );
    (status, output)
}

fn drain(mut from: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = from.read_to_string(&mut text);
        text
    })
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The example running as a child process. Killed on drop if it is still running.
struct Server {
    child: Child,
    addr: SocketAddr,
    stdout: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    fn start(bin: &Path, data: &Path) -> Self {
        let mut child = Command::new(bin)
            .arg(data)
            .env("INCARNATE_HTTP_ADDR", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, stdout) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (sink, mut err) = (stderr.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stdout,
            stderr,
        };
        let line = server.expect_line("listening on http://");
        server.addr = line["listening on http://".len()..]
            .parse()
            .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
        assert_ne!(server.addr.port(), 0, "the bound port, not the requested 0");
        server
    }

    /// Waits for a stdout line starting with `prefix` and returns it.
    fn expect_line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(line) => seen.push(line),
                Err(e) => panic!(
                    "no line {prefix:?} on stdout ({e:?}); stdout so far: {seen:?}; stderr: {}",
                    self.stderr.lock().unwrap()
                ),
            }
        }
    }

    /// Sends `signal` (`-INT`, `-TERM`) with `kill` and waits for the exit.
    fn stop(&mut self, signal: &str) -> ExitStatus {
        self.signal(signal);
        self.wait_exit(signal)
    }

    /// Sends `signal` (`-INT`, `-TERM`) to the server with `kill`.
    fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(sent.success(), "kill {signal} {pid}: {sent}");
    }

    fn wait_exit(&mut self, signal: &str) -> ExitStatus {
        wait_bounded(&mut self.child, EXIT_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "no exit within {EXIT_TIMEOUT:?} after {signal}; stderr: {}",
                self.stderr.lock().unwrap()
            )
        })
    }

    /// Polls `GET /transfers/{id}` until the transfer is no longer `Requested`.
    fn wait_for_transfer_end(&self, id: &str) -> Value {
        let deadline = Instant::now() + SAGA_TIMEOUT;
        loop {
            let (status, body) = self.get(&format!("/transfers/{id}"));
            assert_eq!(status, 200, "transfer {id}: {body}");
            if body["status"] != "Requested" {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "transfer {id} still requested after {SAGA_TIMEOUT:?}: {body}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.request("GET", path, None)
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request("POST", path, Some(body))
    }

    /// One HTTP/1.1 request on a fresh connection; the status and the JSON body (`Null` if empty).
    fn request(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut request = self.begin(method, path, &body);
        request.send(body.as_bytes());
        request.response()
    }

    /// Connects and sends the request head (announcing `body`), not the body itself.
    fn begin(&self, method: &str, path: &str, body: &str) -> InFlight {
        let context = format!("{method} {path}");
        let stream = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("{context}: connect: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut request = InFlight { stream, context };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        request.send(head.as_bytes());
        request
    }

    /// Waits until the server has closed its listener: a new connection is refused.
    fn expect_refused(&self) {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            match TcpStream::connect_timeout(&self.addr, IO_TIMEOUT) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return,
                Err(e) => panic!("connect after the signal: {e}"),
                Ok(_) => assert!(
                    Instant::now() < deadline,
                    "still accepting connections {EXIT_TIMEOUT:?} after the signal"
                ),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until stderr contains `needle`.
    fn expect_stderr(&self, needle: &str) {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while !self.stderr.lock().unwrap().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on stderr: {}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A request being sent on its own connection.
struct InFlight {
    stream: TcpStream,
    context: String,
}

impl InFlight {
    fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .and_then(|()| self.stream.flush())
            .unwrap_or_else(|e| panic!("{}: write: {e}", self.context));
    }

    /// Reads the response to its end: the status and the JSON body (`Null` if empty).
    fn response(mut self) -> (u16, Value) {
        let context = self.context;
        let mut response = Vec::new();
        self.stream
            .read_to_end(&mut response)
            .unwrap_or_else(|e| panic!("{context}: read: {e}"));
        let response = String::from_utf8(response).unwrap();
        let (head, payload) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{context}: no header end in {response:?}"));
        let mut head_lines = head.lines();
        let status_line = head_lines.next().unwrap_or_default();
        let status: u16 = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{context}: bad status line {status_line:?}"));
        let chunked = head_lines.any(|h| {
            h.to_ascii_lowercase()
                .replace(' ', "")
                .starts_with("transfer-encoding:chunked")
        });
        let payload = if chunked {
            dechunk(payload)
        } else {
            payload.to_owned()
        };
        let json = if payload.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&payload).unwrap_or_else(|e| {
                panic!("{context}: {status} body is not JSON ({e}): {payload:?}")
            })
        };
        (status, json)
    }
}

/// Decodes a chunked body (`size-in-hex CRLF data CRLF ... 0 CRLF CRLF`).
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").unwrap_or(&after[size..]);
    }
    out
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
