//! The structured events: one per finished transfer, one per refused
//! request. Field names and order make the text line and the JSON object
//! (see docs/operations.md, "Logs").

use std::net::IpAddr;

use crate::endpoint::{REFUSAL_LOG_PER_SEC, RefusalNote, TransferRecord};

/// A finished transfer, at info whatever its outcome (PXE firmware
/// aborts its first request after the OACK, by design). `local`: the
/// server's address the client talked to.
pub fn transfer(r: &TransferRecord, local: IpAddr) {
    tracing::info!(
        target: "ringtftpd::transfer",
        event = "transfer",
        client = %r.client,
        local = %local,
        file = r.file.as_str(),
        direction = %r.direction,
        bytes = r.bytes,
        blksize = r.blksize,
        windowsize = r.windowsize,
        duration_ms = r.duration_ms,
        retransmits = r.retransmits,
        srtt_ms = r.srtt_ms,
        rto_floor_ms = r.rto_floor_ms,
        outcome = %r.outcome,
        // After the fields of earlier releases, so that their parsers keep working.
        mode = %r.mode,
        blocks = r.blocks,
        options = (!r.options.is_empty()).then_some(r.options.as_str()),
        served = r.served.as_deref(),
        error_code = r.error_code,
        error = r.error,
    );
}

/// A refused request (or the count of those left out over the rate
/// limit), at info.
pub fn refusal(note: &RefusalNote) {
    match note {
        RefusalNote::Refused(r) => tracing::info!(
            target: "ringtftpd::refused",
            event = "refused",
            client = %r.peer,
            file = r.filename.as_str(),
            direction = %(if r.write { "write" } else { "read" }),
            reason = %r.kind.as_str(),
            error_code = r.code.to_u16(),
            error = r.message.as_str(),
        ),
        RefusalNote::Suppressed { lines } => tracing::warn!(
            target: "ringtftpd::refused",
            event = "refused",
            suppressed = *lines,
            "{lines} more refused requests not logged (over {REFUSAL_LOG_PER_SEC}/s); \
             counted by reason at exit"
        ),
    }
}
