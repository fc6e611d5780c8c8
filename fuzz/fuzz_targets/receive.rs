#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringtftpd_fuzz::receive::run(data));
