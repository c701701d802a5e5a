//! Switchboard: a digital channel gateway.
//!
//! | module | what it holds |
//! | --- | --- |
//! | [`domain`] | checked IDs, the interaction and its state machine; no web, no store |
//! | [`config`] | settings: defaults, TOML, environment overrides, `check-config` |
//! | [`manifest`] | the channel manifests of `channels/` |
//! | [`store`] | the storage port and its embedded and Redis backends |
//! | [`adapters`] | the provider-specific code of each channel |
//! | [`gateway`] | the service: ingest, agent actions, outbound, written once over the port |
//! | [`routing`] | the event feed and the event sinks |
//! | [`outbox`] | the delivery worker |
//! | [`http`] | routes only: problem+json at the edge |
//! | [`app`] | the composition root that `serve` and the tests call |

pub mod adapters;
pub mod app;
pub mod config;
pub mod demo;
pub mod demo_smtp;
pub mod domain;
pub mod gateway;
pub mod http;
pub mod manifest;
pub mod metrics;
pub mod outbox;
pub mod routing;
pub mod simulate;
pub mod store;
