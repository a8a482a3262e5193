//! What makes a tandem process a worker: the one skeleton every kind runs
//! through ([`worker`]), the control channel to the supervisor ([`control`]),
//! the settings it receives by section ([`settings`]) and how its text logs
//! write fields ([`log_fields`]).

pub mod control;
pub mod log_fields;
pub mod settings;
pub mod worker;
