//! The interaction rules of PRODUCT.md ("Interactions") and CONTRACT.md
//! ("Settled details" → Rules, "Also settled" → State), checked on the pure
//! state machine in `switchboard::domain`: no network, no store, fixed clocks.
//!
//! | area | tests |
//! | --- | --- |
//! | create and join | `new_*`, `first_message_*`, `a_later_customer_message_*` |
//! | reply, resolve | `reply_*`, `set_as_resolved_*`, `customer_writing_*` |
//! | end | `end_*`, `customer_writing_after_end_*`, `closed_for_new_messages_*` |
//! | assign | `assign_*`, `service_*` |
//! | transfer | `transfer_*` |
//! | delivery | `delivery_*`, `failed_delivery_*` |
//! | unread, API shape | `unread_*`, `to_api_*` |
//! | IDs | `channel_kinds_*`, `phone_*`, `digital_ids_*` |

use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Value};
use switchboard::domain::{
    Actor, ChannelKind, DeliveryStatus, DigitalId, Direction, EventDraft, Interaction, Message,
    NewInteraction, PhoneNumber, Refusal, Status,
};

// ---------------------------------------------------------------- helpers

/// A fixed clock: `t(m)` is `m` minutes after 2026-11-25T10:00:00Z.
fn t(minutes: i64) -> DateTime<Utc> {
    "2026-11-25T10:00:00Z".parse::<DateTime<Utc>>().unwrap() + Duration::minutes(minutes)
}

fn anne() -> Actor {
    Actor::Agent("anne".into())
}

fn bob() -> Actor {
    Actor::Agent("bob".into())
}

fn router() -> Actor {
    Actor::Service("router".into())
}

fn blank(kind: ChannelKind) -> Interaction {
    Interaction::new(NewInteraction {
        case_number: 1001,
        channel_id: "wa-main".into(),
        channel_kind: kind,
        digital_id: "15551234567".into(),
        contact_id: "contact-1".into(),
        contact_name: Some("Kerry".into()),
        queue: "support".into(),
        now: t(0),
    })
}

fn inbound(id: &str, text: &str, at: DateTime<Utc>) -> Message {
    Message {
        id: id.into(),
        direction: Direction::Inbound,
        text: text.into(),
        attachments: vec![],
        sent_at: at,
        status: DeliveryStatus::Received,
        error: None,
        provider_id: Some(format!("wamid.{id}")),
        author: None,
        sms: None,
        reply_to: None,
        reactions: vec![],
        retracted: false,
        kind: None,
        html: None,
        raw: None,
    }
}

fn outbound(id: &str, text: &str, at: DateTime<Utc>) -> Message {
    Message {
        id: id.into(),
        direction: Direction::Outbound,
        text: text.into(),
        attachments: vec![],
        sent_at: at,
        status: DeliveryStatus::Queued,
        error: None,
        provider_id: None,
        author: Some("anne".into()),
        sms: None,
        reply_to: None,
        reactions: vec![],
        retracted: false,
        kind: None,
        html: None,
        raw: None,
    }
}

fn types(events: &[EventDraft]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

/// A new interaction with its first customer message, as ingest makes it.
fn received() -> Interaction {
    let mut i = blank(ChannelKind::Whatsapp);
    i.receive(inbound("m1", "hi", t(0)), t(0), true);
    i
}

/// A received interaction that anne has opened.
fn held_by_anne() -> Interaction {
    let mut i = received();
    i.assign(&anne(), "anne", t(1)).unwrap();
    i
}

/// anne has replied (reply `r1`, still `queued`): the interaction is resolved.
fn replied() -> Interaction {
    let mut i = held_by_anne();
    i.reply(&anne(), outbound("r1", "hello", t(2)), t(2))
        .unwrap();
    i
}

fn transfer(
    i: &mut Interaction,
    actor: &Actor,
    to: &str,
    members: &[&str],
    n: u32,
) -> Vec<EventDraft> {
    let members: Vec<String> = members.iter().map(|m| m.to_string()).collect();
    i.transfer(actor, to, &members, t(10 + n as i64), || {
        format!("master-{n}")
    })
    .unwrap()
}

// ---------------------------------------------------- create and join (rule 1)

/// If this fails, a new conversation does not show up as New on its queue and no agent sees it.
#[test]
fn new_interaction_is_new_unassigned_and_in_queue() {
    let i = blank(ChannelKind::Whatsapp);
    assert_eq!(i.status, Status::New);
    assert!(i.in_queue);
    assert_eq!(i.assigned_to, None);
    assert_eq!(i.transfer_count, 0);
    assert_eq!(i.ended_at, None);
    assert_eq!(i.disposition, None);
    assert_eq!(i.queue, "support");
}

/// If this fails, routing engines miss new conversations or see the message before the case exists.
#[test]
fn first_message_emits_created_then_received() {
    let mut i = blank(ChannelKind::Whatsapp);
    let ev = i.receive(inbound("m1", "hi", t(0)), t(0), true);
    assert_eq!(types(&ev), ["interaction.created", "message.received"]);
    assert!(ev.iter().all(|e| e.case_number == 1001));
    assert_eq!(
        ev[0].channel_value(),
        json!({"id": "wa-main", "kind": "whatsapp"})
    );
    assert_eq!(ev[0].data_value()["queue"], "support");
    assert_eq!(ev[1].data_value()["message"]["text"], "hi");
    assert_eq!(i.status, Status::New);
    assert!(i.in_queue);
    assert_eq!(i.messages.len(), 1);
}

/// If this fails, a second message from the same customer creates noise (a second
/// `created`) or changes a New interaction that no agent has answered yet.
#[test]
fn a_later_customer_message_joins_without_created_and_stays_new() {
    let mut i = received();
    let ev = i.receive(inbound("m2", "anyone?", t(5)), t(5), false);
    assert_eq!(types(&ev), ["message.received"]);
    assert_eq!(i.status, Status::New);
    assert!(i.in_queue);
    assert_eq!(i.messages.len(), 2);
    assert_eq!(i.case_number, 1001);
}

/// If this fails, the queue's "received" sort or the messaging window is computed from the
/// wrong clock (the window runs from the provider's timestamp of the latest message).
#[test]
fn a_customer_message_sets_received_at_to_now_and_the_window_start_to_the_provider_time() {
    let mut i = received();
    i.receive(inbound("m2", "late", t(3)), t(7), false);
    assert_eq!(i.received_at, t(7));
    assert_eq!(i.last_customer_at, Some(t(3)));
}

// ------------------------------------------------- reply and resolve (rules 3-5)

/// If this fails, answered conversations stay on the queue and get answered twice.
#[test]
fn reply_by_the_assigned_agent_resolves_and_leaves_the_queue() {
    let mut i = held_by_anne();
    let ev = i
        .reply(&anne(), outbound("r1", "hello", t(2)), t(2))
        .unwrap();
    assert_eq!(types(&ev), ["interaction.resolved"]);
    assert_eq!(ev[0].data_value()["by"], "anne");
    assert_eq!(i.status, Status::Resolved);
    assert!(!i.in_queue);
    assert_eq!(i.assigned_to.as_deref(), Some("anne"));
    assert_eq!(i.messages.last().unwrap().status, DeliveryStatus::Queued);
}

/// If this fails, an Open interaction (customer wrote again) cannot be answered back to Resolved.
#[test]
fn reply_to_an_open_interaction_resolves_it_again() {
    let mut i = replied();
    i.receive(inbound("m2", "one more thing", t(3)), t(3), false);
    assert_eq!(i.status, Status::Open);
    let ev = i
        .reply(&anne(), outbound("r2", "sure", t(4)), t(4))
        .unwrap();
    assert_eq!(types(&ev), ["interaction.resolved"]);
    assert_eq!(i.status, Status::Resolved);
    assert!(!i.in_queue);
}

/// If this fails, every extra reply to a resolved case floods the feed with `interaction.resolved`.
#[test]
fn reply_to_an_already_resolved_interaction_adds_the_message_without_a_new_resolved_event() {
    let mut i = replied();
    let ev = i
        .reply(&anne(), outbound("r2", "p.s.", t(3)), t(3))
        .unwrap();
    assert!(ev.is_empty(), "{:?}", types(&ev));
    assert_eq!(i.messages.len(), 3);
    assert_eq!(i.status, Status::Resolved);
}

/// If this fails, an agent can answer a customer someone else is handling.
#[test]
fn reply_by_someone_else_is_refused_not_assigned_and_changes_nothing() {
    let mut i = held_by_anne();
    let before = i.clone();
    let r = i.reply(&bob(), outbound("r1", "me too", t(2)), t(2));
    assert_eq!(r, Err(Refusal::NotAssigned));
    assert_eq!(i, before);
}

/// If this fails, an agent can answer from the queue without taking the interaction first.
#[test]
fn reply_to_an_unassigned_interaction_is_refused_not_assigned() {
    let mut i = received();
    let r = i.reply(&anne(), outbound("r1", "hi", t(2)), t(2));
    assert_eq!(r, Err(Refusal::NotAssigned));
    assert_eq!(i.status, Status::New);
    assert_eq!(i.messages.len(), 1);
}

/// If this fails, a customer's answer to our reply is never seen again: it stays off the queue.
#[test]
fn customer_writing_after_a_reply_reopens_and_requeues_still_assigned() {
    let mut i = replied();
    let ev = i.receive(inbound("m2", "thanks, but", t(3)), t(3), false);
    assert_eq!(types(&ev), ["interaction.reopened", "message.received"]);
    assert_eq!(i.status, Status::Open);
    assert!(i.in_queue);
    assert_eq!(
        i.assigned_to.as_deref(),
        Some("anne"),
        "rule 2: assigned until End or Transfer"
    );
}

/// If this fails, every customer message on an Open case emits a spurious `interaction.reopened`.
#[test]
fn customer_writing_to_an_open_interaction_does_not_reopen_it_again() {
    let mut i = replied();
    i.receive(inbound("m2", "a", t(3)), t(3), false);
    let ev = i.receive(inbound("m3", "b", t(4)), t(4), false);
    assert_eq!(types(&ev), ["message.received"]);
    assert_eq!(i.status, Status::Open);
}

/// If this fails, agents cannot clear a message that needed no answer ("thanks!").
#[test]
fn set_as_resolved_resolves_without_sending_and_leaves_the_queue() {
    let mut i = held_by_anne();
    let ev = i.resolve(&anne(), t(2)).unwrap();
    assert_eq!(types(&ev), ["interaction.resolved"]);
    assert_eq!(i.status, Status::Resolved);
    assert!(!i.in_queue);
    assert_eq!(i.messages.len(), 1, "nothing is sent");
    assert_eq!(i.assigned_to.as_deref(), Some("anne"));
}

/// If this fails, an agent can resolve a case another agent is working on.
#[test]
fn set_as_resolved_by_someone_else_is_refused_not_assigned() {
    let mut i = held_by_anne();
    assert_eq!(i.resolve(&bob(), t(2)), Err(Refusal::NotAssigned));
    assert_eq!(i.status, Status::New);
    assert!(i.in_queue);
}

/// If this fails, resolving twice emits a second `interaction.resolved` instead of a 409.
#[test]
fn set_as_resolved_twice_is_an_invalid_transition() {
    let mut i = replied();
    assert!(matches!(
        i.resolve(&anne(), t(3)),
        Err(Refusal::InvalidTransition(_))
    ));
}

// ------------------------------------------------------------------ end (rule 6)

/// If this fails, End changes the case's status, leaves it on the queue or with its agent,
/// or loses the disposition the agent filled in.
#[test]
fn end_keeps_status_unassigns_leaves_queue_and_records_the_disposition() {
    for (setup, status) in [
        (held_by_anne as fn() -> Interaction, Status::New),
        (replied as fn() -> Interaction, Status::Resolved),
    ] {
        let mut i = setup();
        let ev = i
            .end(
                &anne(),
                Some("Acme Ltd".into()),
                Some("CRM-42".into()),
                t(5),
            )
            .unwrap();
        assert_eq!(types(&ev), ["interaction.ended"]);
        assert_eq!(i.status, status, "End does not change the status");
        assert_eq!(i.assigned_to, None);
        assert!(!i.in_queue);
        assert_eq!(i.ended_at, Some(t(5)));
        let d = i.disposition.clone().unwrap();
        assert_eq!(d.related_name.as_deref(), Some("Acme Ltd"));
        assert_eq!(d.related_case.as_deref(), Some("CRM-42"));
        assert_eq!(d.ended_by, "anne");
        assert_eq!(d.ended_at, t(5));
        assert_eq!(i.related_name.as_deref(), Some("Acme Ltd"));
        assert_eq!(i.related_case.as_deref(), Some("CRM-42"));
    }
}

/// If this fails, ending without re-typing the links wipes the related name and case set earlier.
#[test]
fn end_without_links_keeps_the_links_already_set() {
    let mut i = held_by_anne();
    i.related_name = Some("Acme Ltd".into());
    i.related_case = Some("CRM-42".into());
    i.end(&anne(), None, None, t(5)).unwrap();
    let d = i.disposition.unwrap();
    assert_eq!(d.related_name.as_deref(), Some("Acme Ltd"));
    assert_eq!(d.related_case.as_deref(), Some("CRM-42"));
}

/// If this fails, an agent can end a case held by someone else, or end one twice.
#[test]
fn end_by_someone_else_is_refused_and_ending_twice_is_invalid() {
    let mut i = held_by_anne();
    assert_eq!(i.end(&bob(), None, None, t(5)), Err(Refusal::NotAssigned));
    assert_eq!(i.ended_at, None);
    i.end(&router(), None, None, t(5)).unwrap();
    assert!(matches!(
        i.end(&router(), None, None, t(6)),
        Err(Refusal::InvalidTransition(_))
    ));
}

/// If this fails, an agent who ended a case can still reply on it as if they held it.
#[test]
fn end_releases_the_agent_who_can_no_longer_reply() {
    let mut i = replied();
    i.end(&anne(), None, None, t(5)).unwrap();
    assert_eq!(
        i.reply(&anne(), outbound("r2", "hi", t(6)), t(6)),
        Err(Refusal::NotAssigned)
    );
}

/// If this fails, a customer who writes after End is ignored, or stays locked to the old agent.
#[test]
fn customer_writing_after_end_reenters_the_queue_open_and_unassigned() {
    for (setup, was) in [
        (held_by_anne as fn() -> Interaction, Status::New),
        (replied as fn() -> Interaction, Status::Resolved),
    ] {
        let mut i = setup();
        i.end(&anne(), None, None, t(5)).unwrap();
        let ev = i.receive(inbound("m9", "back again", t(60)), t(60), false);
        assert_eq!(
            types(&ev),
            ["interaction.reopened", "message.received"],
            "from {was:?}"
        );
        assert_eq!(i.status, Status::Open, "from {was:?}");
        assert!(i.in_queue);
        assert_eq!(i.assigned_to, None);
        assert_eq!(i.ended_at, None);
        // Any agent may take it now.
        i.assign(&bob(), "bob", t(61)).unwrap();
        assert_eq!(i.assigned_to.as_deref(), Some("bob"));
    }
}

/// If this fails, a customer writing days after End lands in a stale case, or one writing
/// an hour later gets a fresh case and loses the history (default limit: a day).
#[test]
fn closed_for_new_messages_only_once_ended_longer_than_the_limit() {
    let day = Duration::hours(24);
    let mut i = held_by_anne();
    assert!(
        !i.is_closed_for_new_messages(t(0) + Duration::days(30), day),
        "never ended"
    );
    i.end(&anne(), None, None, t(5)).unwrap();
    assert!(!i.is_closed_for_new_messages(t(6), day));
    assert!(!i.is_closed_for_new_messages(t(5) + Duration::hours(23), day));
    assert!(
        !i.is_closed_for_new_messages(t(5) + day, day),
        "exactly 24 h is not more than 24 h"
    );
    assert!(i.is_closed_for_new_messages(t(5) + day + Duration::seconds(1), day));
    assert!(i.is_closed_for_new_messages(t(5) + Duration::hours(25), day));
}

// ---------------------------------------------------------------- assign (rule 2)

/// If this fails, opening an interaction does not make it the agent's, or the feed misses it.
#[test]
fn assign_by_an_agent_takes_it_and_emits_assigned() {
    let mut i = received();
    let ev = i.assign(&anne(), "anne", t(1)).unwrap();
    assert_eq!(types(&ev), ["interaction.assigned"]);
    assert_eq!(ev[0].data_value()["agent"], "anne");
    assert_eq!(i.assigned_to.as_deref(), Some("anne"));
    assert_eq!(i.status, Status::New, "opening is not answering");
    assert!(i.in_queue);
}

/// If this fails, two agents can grab the same customer and both answer.
#[test]
fn assign_by_an_agent_when_another_holds_it_is_already_assigned() {
    let mut i = held_by_anne();
    let before = i.clone();
    assert_eq!(
        i.assign(&bob(), "bob", t(2)),
        Err(Refusal::AlreadyAssigned("anne".into()))
    );
    assert_eq!(i, before);
}

/// If this fails, a routing engine cannot move work from a busy or absent agent.
#[test]
fn service_may_reassign_an_interaction_held_by_another_agent() {
    let mut i = held_by_anne();
    let ev = i.assign(&router(), "bob", t(2)).unwrap();
    assert_eq!(types(&ev), ["interaction.assigned"]);
    assert_eq!(i.assigned_to.as_deref(), Some("bob"));
}

/// If this fails, re-opening one's own case floods the feed or is refused.
#[test]
fn assign_to_the_agent_who_already_holds_it_is_quiet() {
    let mut i = held_by_anne();
    let ev = i.assign(&anne(), "anne", t(3)).unwrap();
    assert!(ev.is_empty());
    assert_eq!(i.assigned_to.as_deref(), Some("anne"));
}

/// If this fails, an agent loses their case when the customer writes, the agent replies or resolves
/// (rule 2: assigned until they End or Transfer it).
#[test]
fn the_agent_stays_assigned_through_messages_replies_and_resolve() {
    let mut i = held_by_anne();
    i.receive(inbound("m2", "x", t(2)), t(2), false);
    i.reply(&anne(), outbound("r1", "y", t(3)), t(3)).unwrap();
    i.receive(inbound("m3", "z", t(4)), t(4), false);
    i.resolve(&anne(), t(5)).unwrap();
    assert_eq!(i.assigned_to.as_deref(), Some("anne"));
}

// -------------------------------------------------------------- transfer (rule 7)

/// If this fails, an agent can move a case someone else is working on.
#[test]
fn transfer_by_someone_other_than_the_holder_is_refused_not_assigned() {
    let mut i = held_by_anne();
    let r = i.transfer(&bob(), "billing", &["bob".into()], t(3), || "x".into());
    assert_eq!(r, Err(Refusal::NotAssigned));
    assert_eq!(i.queue, "support");
    assert_eq!(i.transfer_count, 0);
}

/// If this fails, an agent transferring to a queue where they are the only member loses
/// the case they were about to keep working on.
#[test]
fn transfer_to_a_queue_whose_only_member_is_the_transferring_agent_keeps_it() {
    let mut i = held_by_anne();
    let ev = transfer(&mut i, &anne(), "vip", &["anne"], 1);
    assert_eq!(types(&ev), ["interaction.transferred"]);
    assert_eq!(ev[0].data_value()["from"], "support");
    assert_eq!(ev[0].data_value()["to"], "vip");
    assert_eq!(i.queue, "vip");
    assert_eq!(i.assigned_to.as_deref(), Some("anne"));
    assert!(i.in_queue);
    assert_eq!(i.transfer_count, 1);
}

/// If this fails, a transferred case stays stuck with the old agent instead of waiting on
/// the new queue for its agents.
#[test]
fn transfer_to_any_other_queue_waits_unassigned_on_it() {
    for members in [&["bob"][..], &["anne", "bob"][..], &[][..]] {
        let mut i = held_by_anne();
        transfer(&mut i, &anne(), "billing", members, 1);
        assert_eq!(i.queue, "billing", "members {members:?}");
        assert_eq!(i.assigned_to, None, "members {members:?}");
        assert!(i.in_queue, "members {members:?}");
    }
}

/// If this fails, a routing engine's transfer leaves the case with an agent it chose to move away from.
#[test]
fn transfer_by_a_service_waits_unassigned_even_on_a_one_member_queue() {
    let mut i = held_by_anne();
    transfer(&mut i, &router(), "vip", &["anne"], 1);
    assert_eq!(i.queue, "vip");
    assert_eq!(i.assigned_to, None);
    assert!(i.in_queue);
}

/// If this fails, a routing engine moving an ended case leaves it on the new queue while it still
/// counts as ended, so nobody can End it again and the customer's next message opens a fresh case.
#[test]
fn transfer_by_a_service_of_an_ended_interaction_puts_it_on_the_new_queue_no_longer_ended() {
    let mut i = replied();
    i.end(&anne(), None, None, t(5)).unwrap();
    transfer(&mut i, &router(), "billing", &["bob"], 1);
    assert_eq!(i.queue, "billing");
    assert!(i.in_queue);
    assert_eq!(i.ended_at, None);
    assert_eq!(i.status, Status::Open);
    i.assign(&bob(), "bob", t(20)).unwrap();
    i.end(&bob(), None, None, t(21)).unwrap();
}

/// If this fails, reporting counts transfers wrongly or the master contact ID changes too
/// early or too late (from the 3rd transfer on, every transfer gives a new one).
#[test]
fn transfer_counts_and_gives_a_new_master_contact_id_from_the_third_on() {
    let mut i = held_by_anne();
    let original = i.master_contact_id.clone();
    let queues = ["q1", "q2", "q3", "q4", "q5"];
    let mut seen = vec![original.clone()];
    for (n, q) in queues.iter().enumerate() {
        let n = n as u32 + 1;
        let ev = transfer(&mut i, &anne(), q, &["anne"], n);
        assert_eq!(i.transfer_count, n);
        assert_eq!(ev[0].data_value()["transfer_count"], n);
        assert_eq!(
            ev[0].data_value()["master_contact_id"],
            i.master_contact_id.as_str()
        );
        if n < 3 {
            assert_eq!(i.master_contact_id, original, "transfer {n} keeps it");
        } else {
            assert_eq!(i.master_contact_id, format!("master-{n}"), "transfer {n}");
            assert!(
                !seen.contains(&i.master_contact_id),
                "transfer {n} gives a new one"
            );
        }
        seen.push(i.master_contact_id.clone());
    }
}

/// If this fails, a resolved case moved to another team sits off the queue where nobody sees it.
#[test]
fn transfer_of_a_resolved_interaction_reopens_it_then_transfers() {
    let mut i = replied();
    let ev = transfer(&mut i, &anne(), "billing", &["bob"], 1);
    assert_eq!(
        types(&ev),
        ["interaction.reopened", "interaction.transferred"]
    );
    assert_eq!(i.status, Status::Open);
    assert!(i.in_queue);
    assert_eq!(i.queue, "billing");
}

/// If this fails, transferring a case nobody answered yet marks it as reopened.
#[test]
fn transfer_of_a_new_interaction_keeps_it_new() {
    let mut i = held_by_anne();
    let ev = transfer(&mut i, &anne(), "billing", &["bob"], 1);
    assert_eq!(types(&ev), ["interaction.transferred"]);
    assert_eq!(i.status, Status::New);
}

// ------------------------------------------------------------- delivery status

/// If this fails, a late provider report moves a message backwards (read → delivered) or
/// revives a failed one, and agents see the wrong status.
#[test]
fn delivery_status_order_is_queued_sent_delivered_read_with_failed_terminal() {
    use DeliveryStatus::*;
    let all = [Received, Queued, Sent, Delivered, Read, Failed];
    let allowed = [
        (Queued, Sent),
        (Queued, Delivered),
        (Queued, Read),
        (Queued, Failed),
        (Sent, Delivered),
        (Sent, Read),
        (Sent, Failed),
        (Delivered, Read),
        (Delivered, Failed),
    ];
    for a in all {
        for b in all {
            assert_eq!(
                a.may_become(b),
                allowed.contains(&(a, b)),
                "{} -> {}",
                a.as_str(),
                b.as_str()
            );
        }
    }
}

/// If this fails, the feed misses "the provider accepted it" or reports it twice.
#[test]
fn delivery_queued_to_sent_emits_message_sent_and_later_steps_message_status() {
    let mut i = replied();
    let ev = i.apply_delivery(
        "r1",
        DeliveryStatus::Sent,
        Some("wamid.r1".into()),
        None,
        t(3),
    );
    assert_eq!(types(&ev), ["message.sent"]);
    assert_eq!(ev[0].data_value()["status"], "sent");
    assert_eq!(i.messages[1].provider_id.as_deref(), Some("wamid.r1"));
    let ev = i.apply_delivery("r1", DeliveryStatus::Delivered, None, None, t(4));
    assert_eq!(types(&ev), ["message.status"]);
    let ev = i.apply_delivery("r1", DeliveryStatus::Read, None, None, t(5));
    assert_eq!(types(&ev), ["message.status"]);
    assert_eq!(i.messages[1].status, DeliveryStatus::Read);
    assert_eq!(i.messages[1].provider_id.as_deref(), Some("wamid.r1"));
}

/// If this fails, a provider that skips "sent" makes the feed claim a `message.sent` transition that never happened.
#[test]
fn delivery_queued_straight_to_delivered_is_a_message_status() {
    let mut i = replied();
    let ev = i.apply_delivery("r1", DeliveryStatus::Delivered, None, None, t(3));
    assert_eq!(types(&ev), ["message.status"]);
    assert_eq!(i.messages[1].status, DeliveryStatus::Delivered);
}

/// If this fails, out-of-order or repeated provider reports move a status backwards or repeat events.
#[test]
fn delivery_reports_that_would_go_backwards_or_repeat_are_ignored() {
    let mut i = replied();
    i.apply_delivery("r1", DeliveryStatus::Read, None, None, t(3));
    for late in [
        DeliveryStatus::Sent,
        DeliveryStatus::Delivered,
        DeliveryStatus::Read,
        DeliveryStatus::Queued,
        DeliveryStatus::Failed,
    ] {
        let before = i.clone();
        assert!(i
            .apply_delivery("r1", late, None, Some("x".into()), t(4))
            .is_empty());
        assert_eq!(i, before, "{} after read", late.as_str());
    }
}

/// If this fails, a message marked failed is later shown as delivered and the agent stops retrying.
#[test]
fn delivery_nothing_follows_failed() {
    let mut i = replied();
    i.apply_delivery(
        "r1",
        DeliveryStatus::Failed,
        None,
        Some("131026".into()),
        t(3),
    );
    for late in [
        DeliveryStatus::Sent,
        DeliveryStatus::Delivered,
        DeliveryStatus::Read,
    ] {
        assert!(i.apply_delivery("r1", late, None, None, t(4)).is_empty());
    }
    assert_eq!(i.messages[1].status, DeliveryStatus::Failed);
    assert_eq!(i.messages[1].error.as_deref(), Some("131026"));
}

/// If this fails, a stray report for a message we do not have changes something or emits an event.
#[test]
fn delivery_for_an_unknown_message_does_nothing() {
    let mut i = replied();
    let before = i.clone();
    assert!(i
        .apply_delivery("nope", DeliveryStatus::Sent, None, None, t(3))
        .is_empty());
    assert!(
        i.apply_delivery("m1", DeliveryStatus::Read, None, None, t(3))
            .is_empty(),
        "inbound"
    );
    assert_eq!(i, before);
}

/// If this fails, a customer whose answer bounced is left unanswered: the case stays resolved
/// and off the queue, or loses its agent.
#[test]
fn failed_delivery_reopens_and_requeues_while_staying_assigned() {
    for after in [
        DeliveryStatus::Queued,
        DeliveryStatus::Sent,
        DeliveryStatus::Delivered,
    ] {
        let mut i = replied();
        if after != DeliveryStatus::Queued {
            i.apply_delivery("r1", after, None, None, t(3));
        }
        let ev = i.apply_delivery(
            "r1",
            DeliveryStatus::Failed,
            None,
            Some("bounced".into()),
            t(4),
        );
        assert_eq!(
            types(&ev),
            ["message.status", "interaction.reopened"],
            "failed after {}",
            after.as_str()
        );
        assert_eq!(ev[0].data_value()["status"], "failed");
        assert_eq!(ev[0].data_value()["error"], "bounced");
        assert_eq!(i.status, Status::Open);
        assert!(i.in_queue);
        assert_eq!(i.assigned_to.as_deref(), Some("anne"));
    }
}

/// If this fails, a reply that bounces after the agent ended the case puts it on the queue
/// while it still counts as ended: nobody can End it again, and the customer's next message
/// opens a fresh case a day later.
#[test]
fn failed_delivery_after_end_puts_it_back_on_the_queue_no_longer_ended() {
    let mut i = replied();
    i.end(&anne(), None, None, t(3)).unwrap();
    let ev = i.apply_delivery("r1", DeliveryStatus::Failed, None, None, t(4));
    assert_eq!(types(&ev), ["message.status", "interaction.reopened"]);
    assert_eq!(i.status, Status::Open);
    assert!(i.in_queue);
    assert_eq!(i.ended_at, None);
    assert!(!i.is_closed_for_new_messages(t(4) + Duration::days(2), Duration::hours(24)));
    i.assign(&bob(), "bob", t(5)).unwrap();
    i.end(&bob(), None, None, t(6)).unwrap();
}

// ----------------------------------------------------------------------- unread

/// If this fails, agents' "new" markers and unread counts are wrong: cases they already read
/// look new, or new customer messages go unnoticed.
#[test]
fn unread_is_per_agent_and_set_by_customer_messages_after_opening() {
    let mut i = received();
    assert!(i.unread_for("anne"), "never opened");
    assert!(i.unread_for("bob"), "never opened");
    i.assign(&anne(), "anne", t(1)).unwrap();
    assert!(!i.unread_for("anne"), "false right after assign");
    assert!(i.unread_for("bob"), "per agent");
    i.reply(&anne(), outbound("r1", "hello", t(2)), t(2))
        .unwrap();
    assert!(
        !i.unread_for("anne"),
        "our own reply does not make it unread"
    );
    i.receive(inbound("m2", "more", t(3)), t(3), false);
    assert!(i.unread_for("anne"), "customer wrote after anne opened it");
    assert!(
        i.without_messages().unread_for("anne"),
        "lists carry no messages: the header alone tells"
    );
    i.assign(&anne(), "anne", t(4)).unwrap();
    assert!(!i.unread_for("anne"), "re-opening marks it read");
    i.assign(&router(), "bob", t(5)).unwrap();
    assert!(
        !i.unread_for("bob"),
        "a service giving it to bob marks it read for bob"
    );
}

/// If this fails, an outbound email or SMS with no customer answer yet shows as unread.
#[test]
fn unread_is_false_without_any_customer_message() {
    let mut i = blank(ChannelKind::Sms);
    i.assign(&router(), "anne", t(0)).unwrap();
    i.reply(&anne(), outbound("r1", "hello", t(0)), t(0))
        .unwrap();
    assert!(!i.unread_for("anne"));
    assert!(!i.unread_for("bob"));
    assert!(!i.without_messages().unread_for("bob"));
}

// --------------------------------------------------------------------- API shape

/// If this fails, agent UIs and routing engines break on a renamed or missing field of
/// the interaction JSON (CONTRACT.md "Shapes").
#[test]
fn to_api_has_every_field_of_the_contract_shape() {
    let mut i = held_by_anne();
    i.tags = vec!["billing".into()];
    i.priority = 2;
    i.receive(inbound("m2", "more", t(3)), t(3), false);
    let v = i.to_api(Some("anne"), None);

    assert_eq!(v["case_number"], 1001);
    assert_eq!(v["channel"], json!({"id": "wa-main", "kind": "whatsapp"}));
    assert_eq!(v["digital_id"], "15551234567");
    assert_eq!(v["contact"], json!({"id": "contact-1", "name": "Kerry"}));
    assert_eq!(v["status"], "new");
    assert_eq!(v["queue"], "support");
    assert_eq!(v["in_queue"], true);
    assert_eq!(v["priority"], 2);
    assert_eq!(v["tags"], json!(["billing"]));
    assert_eq!(
        v["received_at"]
            .as_str()
            .map(|s| s.parse::<DateTime<Utc>>().unwrap()),
        Some(t(3))
    );
    assert_eq!(v["assigned_to"], "anne");
    assert_eq!(v["unread"], true);
    assert_eq!(v["transfer_count"], 0);
    assert_eq!(v["master_contact_id"], "contact-1");
    assert_eq!(v["related_name"], Value::Null);
    assert_eq!(v["related_case"], Value::Null);
    assert_eq!(v["ended_at"], Value::Null);
    assert_eq!(v["disposition"], Value::Null);
    for key in [
        "related_name",
        "related_case",
        "ended_at",
        "disposition",
        "assigned_to",
    ] {
        assert!(v.get(key).is_some(), "{key} is present even when null");
    }

    let m = &v["messages"][0];
    for key in [
        "id",
        "direction",
        "text",
        "attachments",
        "sent_at",
        "status",
    ] {
        assert!(m.get(key).is_some(), "message field {key}");
    }
    assert_eq!(m["id"], "m1");
    assert_eq!(m["direction"], "inbound");
    assert_eq!(m["text"], "hi");
    assert_eq!(m["attachments"], json!([]));
    assert_eq!(m["status"], "received");
    assert_eq!(v["messages"].as_array().unwrap().len(), 2);
}

/// If this fails, the UI shows the wrong status word or another agent's unread marker.
#[test]
fn to_api_status_is_lowercase_and_unread_follows_the_viewer() {
    let mut i = replied();
    let v = i.to_api(Some("anne"), None);
    assert_eq!(v["status"], "resolved");
    assert_eq!(v["in_queue"], false);
    assert_eq!(v["messages"][1]["direction"], "outbound");
    assert_eq!(v["messages"][1]["status"], "queued");
    i.receive(inbound("m2", "more", t(3)), t(3), false);
    assert_eq!(i.to_api(Some("anne"), None)["status"], "open");
    assert_eq!(i.to_api(Some("anne"), None)["unread"], true);
    i.assign(&anne(), "anne", t(4)).unwrap();
    assert_eq!(i.to_api(Some("anne"), None)["unread"], false);
    assert_eq!(i.to_api(Some("bob"), None)["unread"], true);
    assert_eq!(i.to_api(None, None)["unread"], false);
}

/// If this fails, an ended case shows its agent or queue state wrongly, or the disposition
/// loses a field (or leaks something that is not in the contract, such as notes).
#[test]
fn to_api_after_end_shows_the_disposition_and_no_agent() {
    let mut i = replied();
    i.end(
        &anne(),
        Some("Acme Ltd".into()),
        Some("CRM-42".into()),
        t(5),
    )
    .unwrap();
    let v = i.to_api(Some("anne"), None);
    assert_eq!(v["status"], "resolved");
    assert_eq!(v["assigned_to"], Value::Null);
    assert_eq!(v["in_queue"], false);
    assert_eq!(
        v["ended_at"]
            .as_str()
            .map(|s| s.parse::<DateTime<Utc>>().unwrap()),
        Some(t(5))
    );
    assert_eq!(v["related_name"], "Acme Ltd");
    assert_eq!(v["related_case"], "CRM-42");
    let d = v["disposition"].as_object().unwrap();
    let mut keys: Vec<&str> = d.keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["ended_at", "ended_by", "related_case", "related_name"]
    );
    assert_eq!(d["related_name"], "Acme Ltd");
    assert_eq!(d["related_case"], "CRM-42");
    assert_eq!(d["ended_by"], "anne");
    assert!(
        !v.to_string().contains("notes"),
        "notes never appear in interaction JSON"
    );
}

/// If this fails, messaging channels lose their window and email loses its subject in the JSON.
#[test]
fn to_api_carries_the_window_and_the_email_subject_when_given() {
    let mut i = received();
    let window = json!({"open": true, "closes_at": "2026-11-26T10:00:00Z", "tag": null});
    assert_eq!(i.to_api(None, Some(window.clone()))["window"], window);
    assert!(i.to_api(None, None).get("subject").is_none());
    i.subject = Some("Invoice".into());
    assert_eq!(i.to_api(None, None)["subject"], "Invoice");
}

// ---------------------------------------------------------------------- IDs

/// If this fails, sorting the inbox by channel gives an order other than PRODUCT.md's.
#[test]
fn channel_kinds_sort_chat_email_facebook_instagram_sms_twitter_whatsapp() {
    use ChannelKind::*;
    let mut kinds = vec![Whatsapp, Sms, Chat, Twitter, Instagram, Email, Facebook];
    kinds.sort();
    assert_eq!(
        kinds,
        [Chat, Email, Facebook, Instagram, Sms, Twitter, Whatsapp]
    );
    let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "chat",
            "email",
            "facebook",
            "instagram",
            "sms",
            "twitter",
            "whatsapp"
        ]
    );
    for k in ChannelKind::ALL {
        assert_eq!(ChannelKind::parse(k.as_str()), Some(k));
        assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
    }
    assert_eq!(ChannelKind::parse("x"), None);
}

/// If this fails, the same phone number typed two ways becomes two contacts, or a number
/// without its country code is accepted and sent to the wrong country.
#[test]
fn phone_numbers_are_canonical_e164() {
    for raw in [
        "+1 (415) 867-5309",
        "+14158675309",
        " +1 415 867 5309 ",
        "+1-415-867-5309",
    ] {
        assert_eq!(
            PhoneNumber::parse(raw).unwrap().as_str(),
            "+14158675309",
            "{raw}"
        );
    }
    assert_eq!(
        PhoneNumber::parse("+44 20 7946 0958").unwrap().as_str(),
        "+442079460958"
    );
    for bad in ["4158675309", "+1 123", "", "+", "not a number"] {
        assert!(PhoneNumber::parse(bad).is_err(), "{bad:?}");
    }
}

/// If this fails, an SMS contact is keyed by whatever formatting the provider used, and
/// the same person splits into several contacts.
#[test]
fn digital_ids_for_sms_are_e164() {
    let a = DigitalId::parse(ChannelKind::Sms, "+1 (415) 867-5309").unwrap();
    let b = DigitalId::parse(ChannelKind::Sms, "+14158675309").unwrap();
    assert_eq!(a, b);
    assert_eq!(a.as_str(), "+14158675309");
    assert!(DigitalId::parse(ChannelKind::Sms, "4158675309").is_err());
}

/// If this fails, `Kerry@Example.com` and `kerry@example.com` become two contacts.
#[test]
fn digital_ids_for_email_compare_the_whole_address_case_insensitively() {
    let a = DigitalId::parse(ChannelKind::Email, " Kerry@Example.COM ").unwrap();
    let b = DigitalId::parse(ChannelKind::Email, "kerry@example.com").unwrap();
    assert_eq!(a, b);
    assert_eq!(a.as_str(), "kerry@example.com");
    for bad in [
        "kerry",
        "@example.com",
        "kerry@",
        "kerry@localhost",
        "Kerry <k@example.com>",
    ] {
        assert!(
            DigitalId::parse(ChannelKind::Email, bad).is_err(),
            "{bad:?}"
        );
    }
}

/// If this fails, an X contact is keyed by a handle (which users change) instead of the numeric ID.
#[test]
fn digital_ids_for_x_are_numeric_user_ids() {
    assert_eq!(
        DigitalId::parse(ChannelKind::Twitter, "3805104374")
            .unwrap()
            .as_str(),
        "3805104374"
    );
    assert!(DigitalId::parse(ChannelKind::Twitter, "@kerry").is_err());
    assert!(DigitalId::parse(ChannelKind::Twitter, "kerry").is_err());
}

/// If this fails, WhatsApp users with a username and no number (business-scoped IDs) are
/// refused, or wa_ids get rewritten and no longer match Meta's.
#[test]
fn digital_ids_for_whatsapp_keep_wa_id_and_business_scoped_ids_as_given() {
    assert_eq!(
        DigitalId::parse(ChannelKind::Whatsapp, "16315551181")
            .unwrap()
            .as_str(),
        "16315551181"
    );
    assert_eq!(
        DigitalId::parse(ChannelKind::Whatsapp, "US.13491208655302741918")
            .unwrap()
            .as_str(),
        "US.13491208655302741918"
    );
}

/// If this fails, an empty or hostile ID from a payload becomes a contact key.
#[test]
fn digital_ids_refuse_empty_control_characters_and_overlong_values() {
    for kind in ChannelKind::ALL {
        assert!(DigitalId::parse(kind, "").is_err(), "{kind}");
        assert!(DigitalId::parse(kind, "   ").is_err(), "{kind}");
    }
    for kind in [
        ChannelKind::Facebook,
        ChannelKind::Instagram,
        ChannelKind::Chat,
        ChannelKind::Whatsapp,
    ] {
        assert!(DigitalId::parse(kind, "abc\ndef").is_err(), "{kind}");
        assert!(DigitalId::parse(kind, &"9".repeat(257)).is_err(), "{kind}");
        assert_eq!(
            DigitalId::parse(kind, " 24680 ").unwrap().as_str(),
            "24680",
            "{kind} trims"
        );
    }
}
