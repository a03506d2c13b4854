//! Placeholder until the dataplane lands.
fn main() {}
