//! Placeholder until the testbed lands.
fn main() {}
