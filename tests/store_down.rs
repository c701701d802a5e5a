//! When the store cannot be reached the gateway says so (503 with
//! Retry-After) and acknowledges nothing; when it is back, the provider's
//! retry is stored once.

mod common;

use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP proxy to Redis that the test can cut, as a network failure would.
struct Proxy {
    addr: SocketAddr,
    accept: JoinHandle<()>,
    conns: std::sync::Arc<parking_lot::Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(addr: Option<SocketAddr>) -> Proxy {
        let listener = TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let c2 = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let h = tokio::spawn(async move {
                    if let Ok(mut upstream) = TcpStream::connect("127.0.0.1:6379").await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await;
                    }
                });
                c2.lock().push(h);
            }
        });
        Proxy {
            addr,
            accept,
            conns,
        }
    }

    fn cut(&self) {
        self.accept.abort();
        for h in self.conns.lock().drain(..) {
            h.abort();
        }
    }
}

/// Readiness and webhooks report an unreachable store with 503, and the provider's retry later lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_is_503_and_nothing_is_acknowledged() {
    let proxy = Proxy::start(None).await;
    let url = format!("redis://{}/0", proxy.addr);
    let app = TestApp::start_with(Backend::Redis, "", |s| s.store.redis_url = url.clone()).await;
    let r = app
        .http
        .get(format!("{}/readyz", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    proxy.cut();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let r = app
        .http
        .get(format!("{}/readyz", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "store_unavailable");
    let (s, body) = app
        .sms_from("+14158675309", "are you there?", "SMdown")
        .await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["code"],
        "store_unavailable"
    );
    // Liveness is not readiness: the process itself is fine.
    assert_eq!(
        app.http
            .get(format!("{}/healthz", app.url))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );

    let _back = Proxy::start(Some(proxy.addr)).await;
    let mut status = 0;
    for _ in 0..50 {
        status = app
            .sms_from("+14158675309", "are you there?", "SMdown")
            .await
            .0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        status, 200,
        "the provider's retry is taken once the store is back"
    );
    app.sms_from("+14158675309", "are you there?", "SMdown")
        .await;
    let case = app.only_case().await;
    assert_eq!(
        app.interaction(case).await["messages"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
