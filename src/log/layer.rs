//! The `tracing_subscriber` layer in front of the log queue: each enabled
//! event becomes a [`Record`] (its fields copied, in order) queued without
//! blocking. Formatting waits for the logger thread.

use std::fmt;
use std::time::SystemTime;

use crossbeam::channel::Sender;
use tracing::field::{Field, Visit};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{Layer, Registry};

use super::{Msg, Record, Value, send};

/// Queues every event it sees; the level filter in front of it (see
/// [`subscriber`]) has already left out the disabled ones.
pub struct Queue {
    tx: Sender<Msg>,
}

/// Our subscriber: events at `level` or above, queued on `tx`. The filter
/// also sets tracing's global maximum level, which the macros compare
/// against before doing anything else.
pub(super) fn subscriber(
    tx: Sender<Msg>,
    level: tracing::Level,
) -> impl tracing::Subscriber + Send + Sync {
    Registry::default()
        .with(LevelFilter::from_level(level))
        .with(Queue { tx })
}

impl<S: tracing::Subscriber> Layer<S> for Queue {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut record = Record {
            time: SystemTime::now(),
            level: (*event.metadata().level()).into(),
            event: None,
            message: None,
            fields: Vec::with_capacity(event.metadata().fields().len()),
        };
        event.record(&mut Fields(&mut record));
        send(&self.tx, Msg::Record(record));
    }
}

/// Copies an event's fields into its record.
struct Fields<'a>(&'a mut Record);

impl Fields<'_> {
    fn push(&mut self, field: &Field, value: Value) {
        self.0.fields.push((field.name(), value));
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "event" => self.0.event = Some(value.to_owned()),
            "message" => self.0.message = Some(value.to_owned()),
            _ => self.push(field, Value::Str(value.to_owned())),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        match field.name() {
            // The format string of `info!("...", args)`.
            "message" => self.0.message = Some(text),
            "event" => self.0.event = Some(text),
            _ => self.push(field, Value::Bare(text)),
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, Value::U64(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, Value::I64(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, Value::F64(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, Value::Bool(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.push(field, Value::Str(value.to_string()));
    }
}
