//! incarnate embedded in an HTTP service (axum): bank accounts and transfers over JSON.
//!
//! | route | what |
//! |---|---|
//! | `POST /accounts/{id}` `{"owner": "Alice"}` | opens an account (201) |
//! | `POST /accounts/{id}/deposit` `{"amount": 500}` | deposits cents |
//! | `POST /accounts/{id}/withdraw` `{"amount": 200}` | withdraws cents |
//! | `POST /transfers/{id}` `{"from": "a", "to": "b", "amount": 100}` | starts a transfer saga (202) |
//! | `GET /accounts/{id}[?after=<position>]` | balance, from the `account_balances` read model |
//! | `GET /accounts/{id}/statement[?after=<position>]` | the account's movements (read model) |
//! | `GET /transfers/{id}` | where the transfer is (`Requested`, `Completed`, `Failed`) |
//!
//! Every request that changes something answers with the global `position` of its last event.
//! Read models are updated asynchronously; a reader that passes `?after=<position>` waits until
//! the read model includes that position before reading (read-your-writes).
//!
//! Errors are JSON `{"error": ..., "message": ...}`: a domain rejection is 409 (422 for an invalid
//! amount) and names the rejection (`"rejection": "InsufficientFunds"`), an account that was
//! never opened is 404, a full mailbox or a stopping runtime 503, a timeout 504, anything else 500.
//!
//! Configuration: the data directory is the first argument, else `INCARNATE_DATA_DIR`, else
//! `data/http_service` (kept across runs). The address is `INCARNATE_HTTP_ADDR` (default
//! `127.0.0.1:3000`; port 0 picks a free port). The service prints `listening on http://ADDR`
//! once it accepts connections. On SIGINT or SIGTERM it stops accepting, finishes the requests in
//! flight, shuts the runtime down (the store is flushed and closed) and prints `shutdown complete`.
//!
//! ```text
//! cargo run --example http_service
//! curl -s -XPOST localhost:3000/accounts/alice -H 'content-type: application/json' -d '{"owner":"Alice"}'
//! curl -s -XPOST localhost:3000/accounts/alice/deposit -H 'content-type: application/json' -d '{"amount":500}'
//! curl -s 'localhost:3000/accounts/alice?after=2'
//! ```

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use incarnate::{CommandError, Committed, ProjectionError, Runtime, RuntimeError};
use incarnate_actors::account::{Account, AccountCommand, AccountError};
use incarnate_actors::balances::{statement, AccountBalances, BALANCES};
use incarnate_actors::transfer::{
    Transfer, TransferCommand, TransferError, TransferSaga, TransferStatus,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

const DEFAULT_DATA_DIR: &str = "data/http_service";
const DEFAULT_ADDR: &str = "127.0.0.1:3000";
const DATA_DIR_ENV: &str = "INCARNATE_DATA_DIR";
const ADDR_ENV: &str = "INCARNATE_HTTP_ADDR";
/// Ids are path segments and store keys: short, printable text.
const MAX_ID_BYTES: usize = 128;

type Error = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let data_dir = data_dir()?;
    let addr: SocketAddr = std::env::var(ADDR_ENV)
        .unwrap_or_else(|_| DEFAULT_ADDR.to_owned())
        .parse()
        .map_err(|e| format!("{ADDR_ENV}: {e}"))?;

    // Signal handlers first, so that a signal arriving once the address is printed is never
    // fatal; the port before the runtime, so that a taken port leaves no runtime to close.
    let stop = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;

    let rt = Runtime::builder()
        .data_dir(data_dir.clone())
        .register::<Account>()
        .register::<Transfer>()
        .projector(AccountBalances)
        .saga(TransferSaga)
        .build()?;

    eprintln!("data in {}", data_dir.display());
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on http://{local}")?;
    out.flush()?;
    drop(out);

    let served = axum::serve(listener, router(rt.clone()))
        .with_graceful_shutdown(async move {
            let name = stop.await;
            eprintln!("{name}: no new connections; finishing requests in flight");
        })
        .await;
    // Requests are done (or the server failed): either way the store must be closed cleanly.
    let stopped = rt.shutdown().await;
    served?;
    stopped?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "shutdown complete")?;
    out.flush()?;
    Ok(())
}

/// The data directory: the first argument, else `INCARNATE_DATA_DIR`, else the default.
fn data_dir() -> Result<PathBuf, Error> {
    let mut args = std::env::args_os().skip(1);
    let dir = match (args.next(), args.next()) {
        (Some(dir), None) if !dir.to_string_lossy().starts_with('-') => PathBuf::from(dir),
        (None, _) => std::env::var_os(DATA_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
        _ => {
            return Err(format!(
                "usage: http_service [DATA_DIR]  (or {DATA_DIR_ENV}; address from {ADDR_ENV})"
            )
            .into())
        }
    };
    Ok(dir)
}

/// Resolves on SIGINT or SIGTERM (Ctrl-C elsewhere) with the signal's name. The handlers are
/// installed when this is called, not when the future is first polled.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<Pin<Box<dyn Future<Output = &'static str> + Send>>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(Box::pin(async move {
        tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        }
    }))
}

#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<Pin<Box<dyn Future<Output = &'static str> + Send>>> {
    Ok(Box::pin(async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "Ctrl-C",
            Err(_) => std::future::pending().await,
        }
    }))
}

fn router(rt: Runtime) -> Router {
    Router::new()
        .route("/accounts/{id}", post(open_account).get(get_account))
        .route("/accounts/{id}/deposit", post(deposit))
        .route("/accounts/{id}/withdraw", post(withdraw))
        .route("/accounts/{id}/statement", get(get_statement))
        .route("/transfers/{id}", post(start_transfer).get(get_transfer))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(rt)
}

// --- requests and responses ---

#[derive(Deserialize)]
struct OpenBody {
    owner: String,
}

#[derive(Deserialize)]
struct AmountBody {
    amount: u64,
}

#[derive(Deserialize)]
struct TransferBody {
    from: String,
    to: String,
    amount: u64,
}

#[derive(Deserialize)]
struct ReadQuery {
    /// A global position the read model must include before the read.
    after: Option<u64>,
}

/// What a command that committed answers.
#[derive(Serialize)]
struct Written {
    id: String,
    /// The aggregate's version after the command.
    version: u64,
    /// The global position of the command's last event: pass it as `?after=` to read it back.
    position: u64,
}

impl Written {
    fn new<E>(rt: &Runtime, id: String, committed: &Committed<E>) -> Self {
        // A command that emitted nothing (a deduplicated retry) is covered by the current head.
        let position = committed
            .events
            .last()
            .map_or_else(|| rt.store().head(), |e| e.position);
        Self {
            id,
            version: committed.version,
            position,
        }
    }
}

// --- handlers ---

async fn open_account(
    State(rt): State<Runtime>,
    Id(id): Id,
    JsonBody(body): JsonBody<OpenBody>,
) -> Result<(StatusCode, Json<Written>), ApiError> {
    let command = AccountCommand::Open { owner: body.owner };
    let committed = rt.send::<Account>(id.as_str(), command).await?;
    Ok((StatusCode::CREATED, Json(Written::new(&rt, id, &committed))))
}

async fn deposit(
    State(rt): State<Runtime>,
    Id(id): Id,
    JsonBody(body): JsonBody<AmountBody>,
) -> Result<Json<Written>, ApiError> {
    let command = AccountCommand::Deposit {
        amount: body.amount,
    };
    let committed = rt.send::<Account>(id.as_str(), command).await?;
    Ok(Json(Written::new(&rt, id, &committed)))
}

async fn withdraw(
    State(rt): State<Runtime>,
    Id(id): Id,
    JsonBody(body): JsonBody<AmountBody>,
) -> Result<Json<Written>, ApiError> {
    let command = AccountCommand::Withdraw {
        amount: body.amount,
    };
    let committed = rt.send::<Account>(id.as_str(), command).await?;
    Ok(Json(Written::new(&rt, id, &committed)))
}

async fn start_transfer(
    State(rt): State<Runtime>,
    Id(id): Id,
    JsonBody(body): JsonBody<TransferBody>,
) -> Result<(StatusCode, Json<Written>), ApiError> {
    let from = valid_id(body.from)?;
    let to = valid_id(body.to)?;
    let command = TransferCommand::Request {
        from,
        to,
        amount: body.amount,
    };
    let committed = rt.send::<Transfer>(id.as_str(), command).await?;
    // The saga moves the money asynchronously: poll GET /transfers/{id}.
    Ok((
        StatusCode::ACCEPTED,
        Json(Written::new(&rt, id, &committed)),
    ))
}

async fn get_account(
    State(rt): State<Runtime>,
    Id(id): Id,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    wait_for_read_model(&rt, query).await?;
    let row = BALANCES
        .load(&*rt.store(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no account {id}")))?;
    Ok(Json(json!({
        "id": id,
        "owner": row.owner,
        "balance": row.balance,
        "closed": row.closed,
        "version": row.version,
    })))
}

async fn get_statement(
    State(rt): State<Runtime>,
    Id(id): Id,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    wait_for_read_model(&rt, query).await?;
    let lines = statement(&*rt.store(), &id).await?;
    if lines.is_empty() {
        return Err(ApiError::not_found(format!("no account {id}")));
    }
    let lines: Vec<Value> = lines
        .into_iter()
        .map(|(sequence, line)| {
            json!({
                "sequence": sequence,
                "position": line.position,
                "kind": line.kind,
                "amount": line.amount,
                "balance": line.balance,
            })
        })
        .collect();
    Ok(Json(json!({ "id": id, "lines": lines })))
}

async fn get_transfer(State(rt): State<Runtime>, Id(id): Id) -> Result<Json<Value>, ApiError> {
    let (transfer, version) = rt.state::<Transfer>(id.as_str()).await?;
    let (status, reason) = match transfer.status {
        TransferStatus::New => return Err(ApiError::not_found(format!("no transfer {id}"))),
        TransferStatus::Requested => ("Requested", None),
        TransferStatus::Completed => ("Completed", None),
        TransferStatus::Failed(reason) => ("Failed", Some(reason)),
    };
    Ok(Json(json!({
        "id": id,
        "status": status,
        "reason": reason,
        "from": transfer.from,
        "to": transfer.to,
        "amount": transfer.amount,
        "version": version,
    })))
}

/// Read-your-writes: waits until the balances read model includes `?after=<position>`.
async fn wait_for_read_model(
    rt: &Runtime,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<(), ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::new(e.status(), "bad_request", e.body_text()))?;
    let Some(position) = query.after else {
        return Ok(());
    };
    // Commands reply only after the head moved, so a position the service handed out is never
    // past it; waiting for one that is would only end in a timeout.
    let head = rt.store().head();
    if position > head {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "position_not_committed",
            format!("position {position} is past the last committed position {head}"),
        ));
    }
    rt.wait_for_projection(AccountBalances::NAME, position)
        .await?;
    Ok(())
}

// --- extractors ---

/// The `{id}` path segment, checked to be a usable aggregate id.
struct Id(String);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::new(e.status(), "bad_request", e.body_text()))?;
        valid_id(id).map(Id)
    }
}

fn valid_id(id: String) -> Result<String, ApiError> {
    if id.is_empty() || id.len() > MAX_ID_BYTES || id.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("ids are 1 to {MAX_ID_BYTES} bytes of text without control characters"),
        ));
    }
    Ok(id)
}

/// A JSON body whose rejections are JSON errors like every other error.
struct JsonBody<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(body)) => Ok(JsonBody(body)),
            Err(e) => Err(ApiError::new(e.status(), "bad_request", e.body_text())),
        }
    }
}

// --- errors ---

/// An error answer: a status and a JSON body `{"error": kind, "message": ..., ...}`.
struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({ "error": kind, "message": message.into() }),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    fn with(mut self, key: &str, value: Value) -> Self {
        if let Value::Object(map) = &mut self.body {
            map.insert(key.to_owned(), value);
        }
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            eprintln!("{}: {}", self.status, self.body);
        }
        let retry = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let mut response = (self.status, Json(self.body)).into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// A domain rejection as HTTP: its status and its name.
trait Rejection: Serialize + std::fmt::Display {
    fn status(&self) -> StatusCode;
    fn name(&self) -> &'static str;
}

impl Rejection for AccountError {
    fn status(&self) -> StatusCode {
        match self {
            AccountError::NotOpen => StatusCode::NOT_FOUND,
            AccountError::InvalidAmount => StatusCode::UNPROCESSABLE_ENTITY,
            AccountError::AlreadyOpen
            | AccountError::AccountClosed
            | AccountError::InsufficientFunds { .. } => StatusCode::CONFLICT,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            AccountError::AlreadyOpen => "AlreadyOpen",
            AccountError::NotOpen => "NotOpen",
            AccountError::AccountClosed => "AccountClosed",
            AccountError::InvalidAmount => "InvalidAmount",
            AccountError::InsufficientFunds { .. } => "InsufficientFunds",
        }
    }
}

impl Rejection for TransferError {
    fn status(&self) -> StatusCode {
        match self {
            TransferError::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
            TransferError::AlreadyRequested
            | TransferError::NotRequested
            | TransferError::AlreadyEnded => StatusCode::CONFLICT,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            TransferError::AlreadyRequested => "AlreadyRequested",
            TransferError::NotRequested => "NotRequested",
            TransferError::AlreadyEnded => "AlreadyEnded",
            TransferError::Invalid => "Invalid",
        }
    }
}

impl<E: Rejection> From<CommandError<E>> for ApiError {
    fn from(e: CommandError<E>) -> Self {
        match e {
            CommandError::Rejected(rejection) => {
                let status = rejection.status();
                let kind = if status == StatusCode::NOT_FOUND {
                    "not_found"
                } else {
                    "rejected"
                };
                ApiError::new(status, kind, rejection.to_string())
                    .with("rejection", json!(rejection.name()))
                    .with(
                        "detail",
                        serde_json::to_value(&rejection).unwrap_or(Value::Null),
                    )
            }
            CommandError::Runtime(e) => e.into(),
        }
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        let (status, kind) = match &e {
            RuntimeError::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            RuntimeError::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
            RuntimeError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, kind, e.to_string())
    }
}

impl From<ProjectionError> for ApiError {
    fn from(e: ProjectionError) -> Self {
        let (status, kind) = match &e {
            ProjectionError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ProjectionError::Stopped { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, kind, e.to_string())
    }
}
