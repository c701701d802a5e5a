//! What a start does before the first request. Its own test binary: the
//! process-wide state it checks must not have been touched by other tests.

mod common;
use common::{Backend, TestApp};
use switchboard::domain::PhoneNumber;

/// libphonenumber's metadata is loaded while the gateway starts, so the
/// first SMS webhook does not wait for it (it took 150–170 ms there). The
/// channel sends through a messaging service, so that no `from` number is
/// checked (which would load it too) and only the start's own load is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_number_metadata_is_loaded_before_the_first_webhook() {
    assert!(!PhoneNumber::metadata_loaded(), "nothing has loaded it yet");
    let app = TestApp::start_with(Backend::Embedded, "", |s| {
        let sms = s.channels.iter_mut().find(|c| c.id == "sms-main").unwrap();
        sms.settings.remove("from");
        sms.settings.insert(
            "messaging_service_sid".into(),
            "MG00000000000000000000000000000000".into(),
        );
    })
    .await;
    assert!(PhoneNumber::metadata_loaded());
    let (status, _) = app.sms_from("+14158675309", "hello", "SMstartup1").await;
    assert_eq!(status, 200);
}
