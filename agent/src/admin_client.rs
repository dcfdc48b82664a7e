//! The CLI side of the admin API: `egret status`, `explain` and `flows` talk to the
//! running agent over a local HTTP connection.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AdminError {
    #[error(
        "cannot reach the agent at {addr} (is `egret run` running with --admin-addr {addr}?): {source}"
    )]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the agent's answer is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Percent-encodes a query value.
#[must_use]
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn request(
    addr: SocketAddr,
    path: &str,
    timeout: Option<Duration>,
) -> Result<BufReader<TcpStream>, AdminError> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|source| AdminError::Connect { addr, source })?;
    stream.set_read_timeout(timeout)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: egret\r\n\r\n")?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    if status != 200 {
        let mut body = String::new();
        reader.read_to_string(&mut body)?;
        return Err(AdminError::Status {
            status,
            body: body.trim().to_owned(),
        });
    }
    Ok(reader)
}

/// GET `path` and parse the JSON answer.
///
/// # Errors
/// When the agent cannot be reached or answers with an error.
pub fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value, AdminError> {
    let mut body = String::new();
    request(addr, path, Some(Duration::from_secs(10)))?.read_to_string(&mut body)?;
    Ok(serde_json::from_str(&body)?)
}

/// GET `path` and call `line` for each JSON line of the streamed answer, until the
/// agent closes the stream or `line` returns false.
///
/// # Errors
/// When the agent cannot be reached or answers with an error.
pub fn follow(
    addr: SocketAddr,
    path: &str,
    mut line: impl FnMut(serde_json::Value) -> bool,
) -> Result<(), AdminError> {
    let reader = request(addr, path, None)?;
    for text in reader.lines() {
        let text = text?;
        if text.trim().is_empty() {
            continue;
        }
        if !line(serde_json::from_str(&text)?) {
            break;
        }
    }
    Ok(())
}
