//! The end-to-end tests, one module per area, linked into one test binary: real hubs and agents
//! over real MQTT, HTTP and SQLite. `cargo test -p larder-tests --test e2e orders::` runs one area.

mod api_errors;
mod audit;
mod backup;
mod careless;
mod catalog;
mod compaction;
mod concurrent_edits;
mod config_check;
mod conflicts;
mod crash;
mod downlink_memory;
mod escrow;
mod flapping;
mod fuzz_corpus;
mod hostile;
mod idempotency;
mod import;
mod isolation;
mod key_rotation;
mod link;
mod offline_pos;
mod orders;
mod oversized;
mod rejections;
mod restart;
mod shutdown;
mod slow_clients;
mod storage_limits;
mod subscriptions;
mod systemd_notify;
mod temperature;
mod tls;
mod trusted_time;
mod upgrade;
mod week_sim;
