//! `ringtftpd top`, the live view (the viewer itself follows), and the
//! shards' live transfers it reads ([`live`]).

pub mod live;
