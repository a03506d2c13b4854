//! A minimal QMP client (QEMU's JSON monitor protocol over a unix socket): the greeting and capabilities
//! handshake, commands with their answers, and the events a watcher reads until QEMU goes away.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::GuestError;

/// Longest QMP line read (QEMU's answers to our commands are a few hundred bytes).
const MAX_LINE: usize = 64 * 1024;

/// One QMP connection, past the capabilities handshake.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    socket: String,
}

/// How a guest's QEMU ended, from its `SHUTDOWN` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// `SHUTDOWN` with this reason (`guest-shutdown`, `guest-reset`, `guest-panic`, `host-qmp-quit`, …).
    Shutdown(String),
    /// The socket closed without a `SHUTDOWN` event (QEMU crashed or was killed).
    Vanished,
}

impl Qmp {
    /// Connects to `socket` and negotiates capabilities, all within `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, GuestError> {
        let name = socket.display().to_string();
        let fail = |why: String| GuestError::Qmp {
            socket: name.clone(),
            reason: why,
        };
        let stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| fail(format!("no connection within {timeout:?}")))?
            .map_err(|e| fail(e.to_string()))?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            socket: name.clone(),
        };
        let greeting = tokio::time::timeout(timeout, qmp.read_message())
            .await
            .map_err(|_| fail(format!("no greeting within {timeout:?}")))??;
        if greeting.get("QMP").is_none() {
            return Err(fail(format!("unexpected greeting {greeting}")));
        }
        tokio::time::timeout(timeout, qmp.execute("qmp_capabilities", None))
            .await
            .map_err(|_| fail(format!("no capabilities answer within {timeout:?}")))??;
        Ok(qmp)
    }

    /// Connects, retrying until `deadline` passes (the socket appears while QEMU starts).
    pub async fn connect_retrying(socket: &Path, deadline: Duration) -> Result<Self, GuestError> {
        let start = tokio::time::Instant::now();
        loop {
            match Self::connect(socket, Duration::from_secs(2)).await {
                Ok(q) => return Ok(q),
                Err(e) if start.elapsed() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    async fn read_message(&mut self) -> Result<Value, GuestError> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = tokio::io::AsyncReadExt::take(&mut self.reader, MAX_LINE as u64)
                .read_until(b'\n', &mut line)
                .await
                .map_err(|e| self.error(e.to_string()))?;
            if n == 0 {
                return Err(self.error("QEMU closed the connection".into()));
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(&line).map_err(|e| self.error(format!("unreadable message: {e}")));
        }
    }

    fn error(&self, reason: String) -> GuestError {
        GuestError::Qmp {
            socket: self.socket.clone(),
            reason,
        }
    }

    /// Runs `command` and returns its `return` value (events arriving meanwhile are skipped).
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, GuestError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|e| self.error(format!("{command}: {e}")))?;
        loop {
            let answer = self.read_message().await?;
            if let Some(ret) = answer.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = answer.get("error") {
                return Err(self.error(format!("{command}: {err}")));
            }
        }
    }

    /// Reads events until QEMU goes away; how it ended.
    pub async fn wait_end(mut self) -> Ending {
        let mut ending = Ending::Vanished;
        while let Ok(msg) = self.read_message().await {
            if msg.get("event").and_then(Value::as_str) == Some("SHUTDOWN") {
                let reason = msg
                    .pointer("/data/reason")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_owned();
                ending = Ending::Shutdown(reason);
            }
        }
        ending
    }
}

/// What an ended guest is reported as: an exit code (0 = it powered itself off) and the reason.
pub fn exit_of(ending: &Ending, qemu_status: Option<i32>) -> (Option<u32>, String) {
    match ending {
        Ending::Shutdown(r) if r == "guest-shutdown" => (Some(0), "the guest powered off".to_owned()),
        Ending::Shutdown(r) if r == "guest-panic" => (Some(1), "the guest kernel panicked".to_owned()),
        Ending::Shutdown(r) if r == "guest-reset" => (
            Some(1),
            "the guest reset (a reboot or a crash; guests do not restart in place)".to_owned(),
        ),
        Ending::Shutdown(r) if r.starts_with("host-") => (Some(137), format!("QEMU was stopped ({r})")),
        Ending::Shutdown(r) => (Some(1), format!("the guest stopped ({r})")),
        Ending::Vanished => match qemu_status {
            Some(code) => (
                Some(u32::try_from(code).unwrap_or(1)),
                format!("QEMU exited with code {code} (see the instance log)"),
            ),
            None => (None, "QEMU vanished (killed or crashed)".to_owned()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_map_to_exit_codes_and_reasons() {
        let e = |r: &str| Ending::Shutdown(r.to_owned());
        assert_eq!(exit_of(&e("guest-shutdown"), Some(0)).0, Some(0));
        assert_eq!(exit_of(&e("guest-reset"), Some(0)).0, Some(1));
        assert!(exit_of(&e("guest-panic"), None).1.contains("panicked"));
        assert_eq!(exit_of(&e("host-signal"), None).0, Some(137));
        assert_eq!(exit_of(&Ending::Vanished, Some(1)).0, Some(1));
        assert!(exit_of(&Ending::Vanished, None).1.contains("vanished"));
    }

    #[tokio::test]
    async fn handshake_command_and_events_against_a_scripted_server() {
        let dir = std::env::temp_dir().join(format!("oak-qmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("q.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .await
                .unwrap();
            let caps = r.next_line().await.unwrap().unwrap();
            assert!(caps.contains("qmp_capabilities"));
            w.write_all(b"{\"return\": {}}\r\n").await.unwrap();
            let cmd = r.next_line().await.unwrap().unwrap();
            assert!(cmd.contains("query-status"));
            w.write_all(b"{\"event\": \"RESUME\", \"data\": {}}\r\n{\"return\": {\"status\": \"running\", \"running\": true}}\r\n")
                .await
                .unwrap();
            w.write_all(
                b"{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": true, \"reason\": \"guest-shutdown\"}}\r\n",
            )
            .await
            .unwrap();
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(2)).await.unwrap();
        let status = q.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "running");
        server.await.unwrap();
        assert_eq!(q.wait_end().await, Ending::Shutdown("guest-shutdown".into()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
