//! The client library against a real server.

use crate::util::{next_event, TestServer, WAIT};
use msgc::client::{Client, Event};

/// `close` flushes what is queued and reports it confirmed; a subscriber gets
/// everything. Repeated, because the server's end of stream and the
/// writer's own verdict race (a close once reported `Disconnected`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_flushes_everything_and_succeeds() {
    let server = TestServer::start(2, "auto", "");
    let sub = server.client().await;
    sub.join("flush").await.expect("join");
    let events = sub.events();
    for round in 0..100u32 {
        let publisher = Client::connect(server.client_config())
            .await
            .expect("connect");
        for i in 0..20u32 {
            publisher
                .publish("flush", format!("{round}.{i}"))
                .await
                .expect("publish");
        }
        let report = publisher.close().await;
        assert!(report.flushed, "round {round}: close failed: {report:?}");
        for i in 0..20u32 {
            let got = next_event(&events, WAIT, |ev| match ev {
                Event::Message { payload, .. } => Some(payload),
                _ => None,
            })
            .await;
            assert_eq!(got, format!("{round}.{i}").as_bytes(), "round {round}");
        }
    }
}

/// A member list longer than one frame allows (tiny max_message_size)
/// arrives in several parts, each within the frame limit, and the client
/// puts them back together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_member_lists_come_in_parts() {
    let server = TestServer::start(2, "auto", "max_message_size = 16");
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..150 {
        let c = server.client().await;
        c.join("crowd").await.expect("join");
        ids.push(c.member_id());
        clients.push(c);
    }
    ids.sort();
    let listed = clients[0].members("crowd").await.expect("members");
    assert_eq!(listed, ids);
    let stats = server.stats();
    assert_eq!(stats["totals"]["protocol_errors"], 0);
}
