//! SMS encoding and segment count (being written).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Segments {
    pub encoding: &'static str,
    pub segments: u32,
    pub characters: usize,
}
pub fn analyze(_text: &str) -> Segments {
    unimplemented!("written with the SMS adapter")
}
