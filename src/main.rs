use clap::Parser;

fn main() {
    let config = ringtftpd::config::Config::parse();
    if let Err(e) = ringtftpd::server::run(&config) {
        eprintln!("ringtftpd: {e}");
        std::process::exit(1);
    }
}
