//! The attacks of issue 18 part 4 ("Tokens and sessions") against a real root-service on 127.0.0.1, each test
//! with its own temporary data directory: forged log lines.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};
use support::Server;

impl Server {
    /// `POST /api/auth/login` as `user`; the status and the body.
    async fn login(&self, user: &str, password: &str) -> (u16, Value) {
        let body = json!({ "username": user, "password": password }).to_string();
        let answer = self.raw("POST", "/api/auth/login", None, Some(&body)).await;
        (answer.status, answer.json())
    }
}

/// Everything the `tracing` subscriber of the test's thread writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A login user name with a newline, a forged log line and ANSI colour codes is logged escaped, on one line.
/// (`#[tokio::test]` runs the server on the test's thread, where the capturing subscriber is installed.)
#[tokio::test]
async fn user_supplied_names_are_logged_escaped() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let server = Server::fresh().await;
    let evil = "mallory\n2030-01-01T00:00:00Z  INFO login username=Admin\x1b[2K\u{202e}";
    let (status, _) = server.login(evil, "wrong").await;
    assert_eq!(status, 401);
    server.stop().await;
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("login refused"))
        .unwrap_or_else(|| panic!("no refusal logged: {text}"));
    assert!(
        line.contains(r"username=mallory\n2030-01-01T00:00:00Z  INFO login username=Admin\u{1b}[2K\u{202e}"),
        "{line}"
    );
    assert!(!text.contains('\x1b') && !text.contains('\u{202e}'), "{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("2030-01-01")),
        "a forged line: {text}"
    );
}
