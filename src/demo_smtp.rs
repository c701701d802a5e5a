//! The demo's in-process SMTP sink: a tiny SMTP server on a loopback port
//! that the demo's email channels send through, so that replies and
//! outbound email work without any mail server.
//!
//! It speaks enough of RFC 5321 for any ordinary client: `EHLO`/`HELO`,
//! `MAIL FROM`, `RCPT TO`, `DATA` (with dot-unstuffing), `RSET`, `NOOP`,
//! `VRFY`, `QUIT`, in the order a real server insists on. It delivers
//! nothing: each accepted message is counted, logged in one line, and
//! summarized (sender, recipients, subject, attachment names, size) in a
//! short in-memory list that the sandbox shows at `/sandbox/smtp/messages`.
//! The message itself is not kept. Every recipient at [`FAIL_DOMAIN`] is
//! refused with `550`, so that the demo can show a failed email.

use serde::Serialize;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// How many message summaries the sink keeps.
pub const KEEP: usize = 50;
/// The largest message accepted (the gateway's own `max_email_bytes`).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// The longest command line accepted (RFC 5321 allows 512 octets).
const MAX_LINE: usize = 4096;
/// At most this many recipients per message (RFC 5321's minimum is 100).
const MAX_RECIPIENTS: usize = 100;
/// Every recipient at this domain is refused (550), so that a failed email
/// can be seen in the demo.
pub const FAIL_DOMAIN: &str = "fail.example";
/// A client silent this long is disconnected.
const IDLE: Duration = Duration::from_secs(300);

/// What the sink remembers of one accepted message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// The sink's own number of the message, from 1.
    pub id: u64,
    pub received_at: chrono::DateTime<chrono::Utc>,
    /// The envelope sender (`MAIL FROM`).
    pub mail_from: String,
    /// The envelope recipients (`RCPT TO`).
    pub rcpt_to: Vec<String>,
    pub subject: Option<String>,
    /// The file names of the message's attachments.
    pub attachments: Vec<String>,
    /// The message's size in bytes, after dot-unstuffing.
    pub size: usize,
}

/// The count and the latest summaries, shared with the sandbox routes.
#[derive(Debug, Default)]
pub struct SinkLog {
    count: AtomicU64,
    latest: Mutex<VecDeque<Summary>>,
}

impl SinkLog {
    /// How many messages were accepted since the start.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The latest summaries, newest first.
    pub fn latest(&self) -> Vec<Summary> {
        let l = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        l.iter().rev().cloned().collect()
    }

    fn record(&self, mail_from: String, rcpt_to: Vec<String>, data: &[u8]) -> Summary {
        let id = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let (subject, attachments) = describe(data);
        let summary = Summary {
            id,
            received_at: chrono::Utc::now(),
            mail_from,
            rcpt_to,
            subject,
            attachments,
            size: data.len(),
        };
        tracing::info!(
            id,
            from = %summary.mail_from,
            to = %summary.rcpt_to.join(", "),
            subject = summary.subject.as_deref().unwrap_or(""),
            attachments = summary.attachments.len(),
            bytes = summary.size,
            "demo SMTP sink accepted a message (not delivered anywhere)"
        );
        let mut l = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() == KEEP {
            l.pop_front();
        }
        l.push_back(summary.clone());
        summary
    }
}

/// The subject and attachment names of a message, if it parses.
fn describe(data: &[u8]) -> (Option<String>, Vec<String>) {
    use mailparse::MailHeaderMap;
    let Ok(m) = mailparse::parse_mail(data) else {
        return (None, vec![]);
    };
    let subject = m.headers.get_first_value("Subject");
    let mut names = vec![];
    let mut stack = vec![&m];
    while let Some(part) = stack.pop() {
        let cd = part.get_content_disposition();
        if cd.disposition == mailparse::DispositionType::Attachment {
            names.push(
                cd.params
                    .get("filename")
                    .cloned()
                    .or_else(|| part.ctype.params.get("name").cloned())
                    .unwrap_or_else(|| "unnamed".into()),
            );
        }
        stack.extend(part.subparts.iter().rev());
    }
    (subject, names)
}

/// The sink, bound and not yet serving.
pub struct SmtpSink {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    log: Arc<SinkLog>,
}

impl SmtpSink {
    /// Binds `addr` (`127.0.0.1:0` picks a free port).
    pub fn bind(addr: &str) -> std::io::Result<SmtpSink> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        Ok(SmtpSink {
            listener,
            addr,
            log: Arc::new(SinkLog::default()),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn log(&self) -> Arc<SinkLog> {
        self.log.clone()
    }

    /// Serves until `shutdown` is cancelled; open sessions end with it.
    pub async fn run(self, shutdown: CancellationToken) {
        let listener = match tokio::net::TcpListener::from_std(self.listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "the demo SMTP sink cannot listen");
                return;
            }
        };
        let mut sessions = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let log = self.log.clone();
                        sessions.spawn(async move {
                            let (r, w) = stream.into_split();
                            if let Err(e) = session(r, w, &log).await {
                                tracing::debug!(error = %e, "demo SMTP sink session ended");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "demo SMTP sink: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
        sessions.shutdown().await;
    }
}

/// One envelope being built.
#[derive(Default)]
struct Transaction {
    from: Option<String>,
    to: Vec<String>,
}

/// The address of `MAIL FROM:<a> ...` or `RCPT TO:<a> ...` after the colon.
fn path_of(rest: &str) -> Option<String> {
    let rest = rest.trim_start();
    if let Some(inner) = rest.strip_prefix('<') {
        let end = inner.find('>')?;
        return Some(inner[..end].to_string());
    }
    // Some clients leave out the brackets.
    let a = rest.split_whitespace().next()?;
    (!a.is_empty()).then(|| a.to_string())
}

fn is_refused(address: &str) -> bool {
    address
        .rsplit_once('@')
        .is_some_and(|(_, d)| d.eq_ignore_ascii_case(FAIL_DOMAIN))
}

/// Strips `prefix` (case-insensitive) from `s`.
fn strip_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

/// One line, without its CRLF (or LF); `None` at the end of the stream.
/// A line longer than `max` is consumed and reported as `Err(true)`.
async fn read_line<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<Result<(), bool>>> {
    buf.clear();
    let mut too_long = false;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(if buf.is_empty() && !too_long {
                None
            } else {
                Some(Ok(()))
            });
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            if buf.len() + take > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&chunk[..take]);
            }
        }
        r.consume(take);
        if done {
            break;
        }
    }
    if too_long {
        return Ok(Some(Err(true)));
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(Ok(())))
}

/// One SMTP session on any byte stream.
pub async fn session<R, W>(r: R, mut w: W, log: &SinkLog) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    const HOST: &str = "localhost";
    let mut r = BufReader::new(r);
    send(
        &mut w,
        &format!("220 {HOST} ESMTP Switchboard demo sink, nothing is delivered\r\n"),
    )
    .await?;
    let mut greeted = false;
    let mut tx = Transaction::default();
    let mut line = Vec::new();
    loop {
        let got = match tokio::time::timeout(IDLE, read_line(&mut r, &mut line, MAX_LINE)).await {
            Err(_) => {
                send(
                    &mut w,
                    "421 4.4.2 Idle too long, closing the connection\r\n",
                )
                .await?;
                return Ok(());
            }
            Ok(got) => got?,
        };
        match got {
            None => return Ok(()),
            Some(Err(_)) => {
                send(&mut w, "500 5.5.2 Line too long\r\n").await?;
                continue;
            }
            Some(Ok(())) => {}
        }
        let cmd = String::from_utf8_lossy(&line).into_owned();
        let verb = cmd
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let answer: String = match verb.as_str() {
            "EHLO" => {
                greeted = true;
                tx = Transaction::default();
                format!(
                    "250-{HOST} greets you\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-SIZE {MAX_MESSAGE_BYTES}\r\n250 ENHANCEDSTATUSCODES\r\n"
                )
            }
            "HELO" => {
                greeted = true;
                tx = Transaction::default();
                format!("250 {HOST}\r\n")
            }
            "MAIL" => match strip_ci(&cmd, "MAIL FROM:") {
                _ if !greeted => "503 5.5.1 Say EHLO or HELO first\r\n".into(),
                _ if tx.from.is_some() => "503 5.5.1 Nested MAIL command\r\n".into(),
                None => "501 5.5.4 Syntax: MAIL FROM:<address>\r\n".into(),
                Some(rest) => match path_of(rest) {
                    Some(a) => {
                        tx.from = Some(a);
                        "250 2.1.0 Sender OK\r\n".into()
                    }
                    None => "501 5.1.7 Bad sender address syntax\r\n".into(),
                },
            },
            "RCPT" => match strip_ci(&cmd, "RCPT TO:") {
                _ if tx.from.is_none() => "503 5.5.1 Need MAIL before RCPT\r\n".into(),
                None => "501 5.5.4 Syntax: RCPT TO:<address>\r\n".into(),
                Some(_) if tx.to.len() >= MAX_RECIPIENTS => {
                    "452 4.5.3 Too many recipients\r\n".into()
                }
                Some(rest) => match path_of(rest) {
                    Some(a) if is_refused(&a) => format!(
                        "550 5.1.1 <{a}>: no such mailbox (the demo sink refuses every address at {FAIL_DOMAIN})\r\n"
                    ),
                    Some(a) if !a.is_empty() => {
                        tx.to.push(a);
                        "250 2.1.5 Recipient OK\r\n".into()
                    }
                    _ => "501 5.1.3 Bad recipient address syntax\r\n".into(),
                },
            },
            "DATA" => {
                if tx.to.is_empty() {
                    "503 5.5.1 Need RCPT before DATA\r\n".into()
                } else {
                    send(&mut w, "354 End data with <CR><LF>.<CR><LF>\r\n").await?;
                    let (data, too_big) = match read_data(&mut r, &mut line).await? {
                        Some(d) => d,
                        None => return Ok(()),
                    };
                    let tx = std::mem::take(&mut tx);
                    if too_big {
                        "552 5.3.4 Message too big\r\n".into()
                    } else {
                        let s = log.record(tx.from.unwrap_or_default(), tx.to, &data);
                        format!("250 2.0.0 OK: queued as {}\r\n", s.id)
                    }
                }
            }
            "RSET" => {
                tx = Transaction::default();
                "250 2.0.0 OK\r\n".into()
            }
            "NOOP" => "250 2.0.0 OK\r\n".into(),
            "VRFY" => "252 2.5.2 Cannot VRFY user, but will accept the message\r\n".into(),
            "QUIT" => {
                send(&mut w, "221 2.0.0 Bye\r\n").await?;
                return Ok(());
            }
            "STARTTLS" | "AUTH" | "EXPN" | "TURN" | "BDAT" => {
                "502 5.5.1 Command not implemented\r\n".into()
            }
            _ => "500 5.5.2 Command not recognized\r\n".into(),
        };
        send(&mut w, &answer).await?;
    }
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, text: &str) -> std::io::Result<()> {
    w.write_all(text.as_bytes()).await?;
    w.flush().await
}

/// The message after `354`, dot-unstuffed, up to the line with a single dot;
/// `(data, too_big)`, or `None` when the client went away.
async fn read_data<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    line: &mut Vec<u8>,
) -> std::io::Result<Option<(Vec<u8>, bool)>> {
    let mut data = Vec::new();
    let mut too_big = false;
    loop {
        // Message lines may be long (RFC 5321 says 1000, real mail breaks it).
        let got = tokio::time::timeout(IDLE, read_line(r, line, MAX_MESSAGE_BYTES))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "idle in DATA"))??;
        match got {
            None => return Ok(None),
            Some(Err(_)) => too_big = true,
            Some(Ok(())) => {
                if line.as_slice() == b"." {
                    return Ok(Some((data, too_big)));
                }
                let content = line.strip_prefix(b".").unwrap_or(line);
                if data.len() + content.len() + 2 > MAX_MESSAGE_BYTES {
                    too_big = true;
                }
                if !too_big {
                    data.extend_from_slice(content);
                    data.extend_from_slice(b"\r\n");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays `input` (the client's side, pipelined) to a session; the
    /// server's answers, one per line, and what it logged.
    async fn talk(input: &str) -> (Vec<String>, SinkLog) {
        let log = SinkLog::default();
        let mut out = Vec::new();
        session(input.as_bytes(), &mut out, &log).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("\r\n"), "every answer ends with CRLF");
        (text.lines().map(str::to_string).collect(), log)
    }

    fn codes(lines: &[String]) -> Vec<&str> {
        lines.iter().map(|l| &l[..4]).collect()
    }

    #[tokio::test]
    async fn a_whole_transaction_is_accepted_and_summarized() {
        let (lines, log) = talk(
            "EHLO client.example\r\n\
             MAIL FROM:<support@demo.example> BODY=8BITMIME\r\n\
             RCPT TO:<kerry@example.com>\r\n\
             rcpt to: <anne@example.com>\r\n\
             DATA\r\n\
             From: support@demo.example\r\n\
             Subject: Your order\r\n\
             \r\n\
             Hello\r\n\
             ..a line that starts with a dot\r\n\
             .\r\n\
             QUIT\r\n",
        )
        .await;
        assert_eq!(
            codes(&lines),
            vec![
                "220 ", "250-", "250-", "250-", "250-", "250 ", "250 ", "250 ", "250 ", "354 ",
                "250 ", "221 "
            ],
            "{lines:?}"
        );
        assert_eq!(lines[10], "250 2.0.0 OK: queued as 1");
        assert_eq!(log.count(), 1);
        let s = &log.latest()[0];
        assert_eq!(s.mail_from, "support@demo.example");
        assert_eq!(s.rcpt_to, vec!["kerry@example.com", "anne@example.com"]);
        assert_eq!(s.subject.as_deref(), Some("Your order"));
        // The dot-stuffed line lost its first dot.
        let expected = "From: support@demo.example\r\nSubject: Your order\r\n\r\nHello\r\n.a line that starts with a dot\r\n";
        assert_eq!(s.size, expected.len());
    }

    #[tokio::test]
    async fn data_is_dot_unstuffed_up_to_the_lone_dot() {
        let mut r = BufReader::new(&b"a\r\n..b\r\n.c\r\n...\r\n\r\n.\r\nNOOP\r\n"[..]);
        let mut line = Vec::new();
        let (data, too_big) = read_data(&mut r, &mut line).await.unwrap().unwrap();
        assert!(!too_big);
        assert_eq!(data, b"a\r\n.b\r\nc\r\n..\r\n\r\n");
        // What follows the lone dot is the next command.
        assert_eq!(
            read_line(&mut r, &mut line, MAX_LINE).await.unwrap(),
            Some(Ok(()))
        );
        assert_eq!(line, b"NOOP");
    }

    #[tokio::test]
    async fn commands_out_of_order_are_refused_as_a_server_does() {
        let (lines, log) = talk(
            "MAIL FROM:<a@example.com>\r\n\
             HELO client\r\n\
             RCPT TO:<b@example.com>\r\n\
             DATA\r\n\
             MAIL FROM:<a@example.com>\r\n\
             MAIL FROM:<a@example.com>\r\n\
             RSET\r\n\
             RCPT TO:<b@example.com>\r\n\
             NOOP\r\n\
             VRFY anne\r\n\
             STARTTLS\r\n\
             HELLO\r\n\
             MAIL TO:<x@example.com>\r\n\
             QUIT\r\n\
             NOOP\r\n",
        )
        .await;
        assert_eq!(
            codes(&lines),
            vec![
                "220 ", // greeting
                "503 ", // MAIL before HELO
                "250 ", // HELO
                "503 ", // RCPT before MAIL
                "503 ", // DATA before RCPT
                "250 ", // MAIL
                "503 ", // nested MAIL
                "250 ", // RSET
                "503 ", // RCPT after RSET
                "250 ", // NOOP
                "252 ", // VRFY
                "502 ", // STARTTLS is not offered
                "500 ", // unknown
                "501 ", // MAIL without FROM:
                "221 ", // QUIT; nothing after it is read
            ],
            "{lines:?}"
        );
        assert_eq!(log.count(), 0);
    }

    #[tokio::test]
    async fn a_client_that_goes_away_mid_message_leaves_nothing() {
        let (lines, log) =
            talk("EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nSubject: x\r\n")
                .await;
        assert_eq!(lines.last().map(|l| &l[..4]), Some("354 "));
        assert_eq!(log.count(), 0);
    }

    #[tokio::test]
    async fn recipients_at_the_fail_domain_are_refused() {
        let (lines, log) = talk(
            "EHLO c\r\nMAIL FROM:<a@demo.example>\r\nRCPT TO:<kerry@Fail.Example>\r\nDATA\r\nQUIT\r\n",
        )
        .await;
        assert_eq!(codes(&lines)[6..], ["250 ", "550 ", "503 ", "221 "]);
        assert!(lines[7].contains("kerry@Fail.Example"), "{}", lines[7]);
        assert_eq!(log.count(), 0);
    }

    #[tokio::test]
    async fn an_overlong_command_line_is_refused_and_the_session_goes_on() {
        let long = "X".repeat(MAX_LINE + 10);
        let (lines, _) = talk(&format!("{long}\r\nNOOP\r\nQUIT\r\n")).await;
        assert_eq!(codes(&lines), vec!["220 ", "500 ", "250 ", "221 "]);
    }

    /// lettre, the gateway's own SMTP client, sends through the sink over TCP.
    #[tokio::test]
    async fn lettre_sends_a_message_with_an_attachment_through_the_sink() {
        use lettre::message::{header::ContentType, Attachment, MultiPart, SinglePart};
        use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
        let sink = SmtpSink::bind("127.0.0.1:0").unwrap();
        let port = sink.local_addr().port();
        let log = sink.log();
        let stop = CancellationToken::new();
        let server = tokio::spawn(sink.run(stop.clone()));
        let email = lettre::Message::builder()
            .from("Support <support@demo.example>".parse().unwrap())
            .to("kerry@example.com".parse().unwrap())
            .subject("Your invoice")
            .multipart(
                MultiPart::mixed()
                    .singlepart(SinglePart::plain(
                        ".starts with a dot\r\n.\r\nand goes on".to_string(),
                    ))
                    .singlepart(Attachment::new("invoice.pdf".into()).body(
                        b"%PDF-1.4".to_vec(),
                        ContentType::parse("application/pdf").unwrap(),
                    )),
            )
            .unwrap();
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(port)
            .build();
        transport.send(email.clone()).await.unwrap();
        transport.send(email).await.unwrap();
        assert_eq!(log.count(), 2);
        let latest = log.latest();
        assert_eq!(latest[0].id, 2, "newest first");
        assert_eq!(latest[1].subject.as_deref(), Some("Your invoice"));
        assert_eq!(latest[1].rcpt_to, vec!["kerry@example.com"]);
        assert_eq!(latest[1].mail_from, "support@demo.example");
        assert_eq!(latest[1].attachments, vec!["invoice.pdf"]);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the sink stops when asked")
            .unwrap();
    }
}
