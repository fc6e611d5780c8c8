use std::os::fd::AsFd;

fn main() {
    // `ringtftpd top ...`: the live view (see ringtftpd::top for when
    // argv means it rather than a directory named `top`).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let inetd = ringtftpd::server::is_socket(std::io::stdin().as_fd());
    match ringtftpd::top::invocation(&argv, inetd) {
        ringtftpd::top::Invocation::Top(args) => std::process::exit(ringtftpd::top::main(args)),
        ringtftpd::top::Invocation::Help(e) => e.exit(),
        ringtftpd::top::Invocation::Server => {}
    }
    let config = ringtftpd::config::Config::parse_checked();
    if let Err(e) = ringtftpd::server::run(&config) {
        ringtftpd::server::fatal(&e);
        std::process::exit(1);
    }
}
