//! Real mail servers for the email tests, each started on a free port with
//! its own files in a tempdir (never the system services). Install them
//! with `scripts/email-servers.sh`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

/// The Python of the venv `scripts/email-servers.sh` creates.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("SWITCHBOARD_TEST_SMTP_PYTHON") {
        return p.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/email-venv/bin/python")
}

fn support(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/email_support")
        .join(file)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// aiosmtpd on a free port, writing what it receives to a tempdir.
pub struct SmtpServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
    _stdin: ChildStdin,
}

impl SmtpServer {
    pub fn start() -> SmtpServer {
        let py = python();
        assert!(
            py.exists(),
            "{} is missing: run scripts/email-servers.sh",
            py.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut child = Command::new(&py)
            .arg(support("smtp_server.py"))
            .arg(port.to_string())
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting aiosmtpd");
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "aiosmtpd did not start");
        SmtpServer {
            port,
            dir,
            child,
            _stdin: stdin,
        }
    }

    /// The raw messages received so far, oldest first.
    pub fn received(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        v.sort();
        v
    }

    /// Waits for the `n`th message and reads it with Python's email package.
    pub async fn message(&self, n: usize) -> serde_json::Value {
        for _ in 0..100 {
            let got = self.received();
            if got.len() > n {
                let out = Command::new(python())
                    .arg(support("read_mail.py"))
                    .arg(&got[n])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                return serde_json::from_slice(&out.stdout).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the SMTP server received no message #{n}");
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
