//! SMS over Twilio Programmable Messaging (being written).
pub mod segments;
