fn main() {
    let config = ringtftpd::config::Config::parse_checked();
    if let Err(e) = ringtftpd::server::run(&config) {
        ringtftpd::server::fatal(&e);
        std::process::exit(1);
    }
}
