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

/// The SMTP login of [`SmtpServer::start_secure`].
pub const SMTP_USER: &str = "relay-user";
pub const SMTP_PASSWORD: &str = "relay-secret-of-the-tests";

/// How [`SmtpServer::start_secure`] secures its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpMode {
    /// STARTTLS required before anything else.
    StartTls,
    /// Implicit TLS from the first byte.
    Tls,
}

impl SmtpServer {
    pub fn start() -> SmtpServer {
        SmtpServer::launch(None, free_port())
    }

    /// Plain, on a port chosen before (a relay that comes up late).
    pub fn start_on(port: u16) -> SmtpServer {
        SmtpServer::launch(None, port)
    }

    /// With TLS (its certificate signed by the test CA at
    /// [`SmtpServer::ca_file`]) and AUTH required as [`SMTP_USER`] /
    /// [`SMTP_PASSWORD`].
    pub fn start_secure(mode: SmtpMode) -> SmtpServer {
        SmtpServer::launch(Some(mode), free_port())
    }

    /// The test CA that signed the server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("certs/ca.pem")
    }

    /// How message `n` came in: `{"tls": bool, "login": user or null}`.
    pub fn session(&self, n: usize) -> serde_json::Value {
        let got = self.received();
        let meta = got[n].with_extension("json");
        serde_json::from_slice(&std::fs::read(meta).unwrap()).unwrap()
    }

    fn launch(mode: Option<SmtpMode>, port: u16) -> SmtpServer {
        let py = python();
        assert!(
            py.exists(),
            "{} is missing: run scripts/email-servers.sh",
            py.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(&py);
        cmd.arg(support("smtp_server.py"))
            .arg(port.to_string())
            .arg(dir.path());
        if let Some(mode) = mode {
            let certs = dir.path().join("certs");
            std::fs::create_dir_all(&certs).unwrap();
            make_certificates(&certs);
            cmd.arg(match mode {
                SmtpMode::StartTls => "starttls",
                SmtpMode::Tls => "tls",
            })
            .arg(&certs)
            .arg(SMTP_USER)
            .arg(SMTP_PASSWORD);
        }
        let mut child = cmd
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

/// The IMAP user of the test Dovecot, and the channel's mailbox.
pub const IMAP_USER: &str = "support";
pub const IMAP_PASSWORD: &str = "secret-of-the-tests";
pub const MAILBOX: &str = "Support";

fn id_of(flag: &str) -> String {
    let out = Command::new("id").arg(flag).output().expect("running id");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A real Dovecot IMAP server on a free port, with its own configuration,
/// users and mail in a tempdir (never the system service). As root it
/// drops to Debian's `dovecot`/`dovenull` users and keeps mail as `nobody`;
/// as another user it runs as that user.
pub struct Dovecot {
    pub port: u16,
    /// The implicit TLS port, when started with [`Dovecot::start_tls`].
    pub tls_port: Option<u16>,
    pub dir: tempfile::TempDir,
    child: Child,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is missing: run scripts/email-servers.sh");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA (`ca.pem`) and a certificate for 127.0.0.1 signed by it
/// (`cert.pem`, `key.pem`), made with the openssl command.
fn make_certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=Switchboard test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ],
    );
}

impl Dovecot {
    pub fn start() -> Dovecot {
        Dovecot::launch(false)
    }

    /// With an implicit TLS listener too, its certificate signed by the
    /// test CA at [`Dovecot::ca_file`].
    pub fn start_tls() -> Dovecot {
        Dovecot::launch(true)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn launch(tls: bool) -> Dovecot {
        let bin = ["/usr/sbin/dovecot", "/usr/local/sbin/dovecot"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("dovecot is missing: run scripts/email-servers.sh");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let root = id_of("-u") == "0";
        let (internal, login, uid, gid) = if root {
            (
                "dovecot".to_string(),
                "dovenull".to_string(),
                "65534".to_string(),
                "65534".to_string(),
            )
        } else {
            let me = id_of("-un");
            (me.clone(), me, id_of("-u"), id_of("-g"))
        };
        let mail = d.join("mail");
        std::fs::create_dir_all(&mail).unwrap();
        std::fs::create_dir_all(d.join("run")).unwrap();
        if root {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::os::unix::fs::chown(&mail, Some(65534), Some(65534)).unwrap();
        }
        std::fs::write(
            d.join("passwd"),
            format!("{IMAP_USER}:{{PLAIN}}{IMAP_PASSWORD}::::::\n"),
        )
        .unwrap();
        let port = free_port();
        let tls_port = tls.then(free_port);
        let (ssl, imaps) = match tls_port {
            Some(p) => {
                make_certificates(d);
                (
                    format!(
                        "ssl = yes\nssl_cert = <{d}/cert.pem\nssl_key = <{d}/key.pem",
                        d = d.display()
                    ),
                    format!("address = 127.0.0.1\n    port = {p}\n    ssl = yes"),
                )
            }
            None => ("ssl = no".to_string(), "port = 0".to_string()),
        };
        let conf = format!(
            r#"
base_dir = {d}/run
state_dir = {d}/state
instance_name = sbtest-{port}
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = {internal}
default_internal_group = {internal_group}
default_login_user = {login}
mail_location = maildir:{d}/mail/%u
mailbox_idle_check_interval = 1 secs
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/mail/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    {imaps}
  }}
}}
service anvil {{
  chroot =
}}
"#,
            d = d.display(),
            internal_group = if root {
                "dovecot".to_string()
            } else {
                id_of("-gn")
            },
        );
        let conf_path = d.join("dovecot.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(bin)
            .arg("-F")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting dovecot");
        let server = Dovecot {
            port,
            tls_port,
            dir,
            child,
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("dovecot did not listen on {port}:\n{}", server.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    /// The `imap = {...}` of a channel polling this server's test mailbox.
    pub fn channel_imap(&self, poll_seconds: u64) -> String {
        format!(
            r#"{{ host = "127.0.0.1", port = {}, tls = false, username = "{IMAP_USER}", password = "{IMAP_PASSWORD}", mailbox = "{MAILBOX}", poll_seconds = {poll_seconds} }}"#,
            self.port
        )
    }

    /// A session as the test user (what a mail client or the MTA would do).
    pub async fn user(&self) -> ImapUser {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let mut client = async_imap::Client::new(tcp);
        client.read_response().await.unwrap().unwrap();
        let session = client
            .login(IMAP_USER, IMAP_PASSWORD)
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        ImapUser { session }
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its own children.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the test user sees of one message: its UID and flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub uid: u32,
    pub flags: Vec<String>,
}

pub struct ImapUser {
    pub session: async_imap::Session<tokio::net::TcpStream>,
}

impl ImapUser {
    pub async fn create(&mut self, mailbox: &str) {
        self.session.create(mailbox).await.unwrap();
    }

    pub async fn delete(&mut self, mailbox: &str) {
        self.session.delete(mailbox).await.unwrap();
    }

    /// APPENDs one raw message, as delivery would.
    pub async fn append(&mut self, mailbox: &str, raw: &[u8]) {
        self.session.append(mailbox, None, None, raw).await.unwrap();
    }

    /// The mailbox's UIDVALIDITY (read-only look).
    pub async fn uid_validity(&mut self, mailbox: &str) -> u32 {
        let m = self.session.examine(mailbox).await.unwrap();
        m.uid_validity.unwrap()
    }

    /// Every message's UID and flags, read-only (EXAMINE, FETCH FLAGS).
    pub async fn flags(&mut self, mailbox: &str) -> Vec<Seen> {
        use futures_util::TryStreamExt;
        let m = self.session.examine(mailbox).await.unwrap();
        if m.exists == 0 {
            return vec![];
        }
        let fetches: Vec<_> = self
            .session
            .fetch("1:*", "(UID FLAGS)")
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let mut out: Vec<Seen> = fetches
            .iter()
            .map(|f| Seen {
                uid: f.uid.unwrap(),
                flags: f.flags().map(|fl| format!("{fl:?}")).collect(),
            })
            .collect();
        out.sort_by_key(|s| s.uid);
        out
    }
}
