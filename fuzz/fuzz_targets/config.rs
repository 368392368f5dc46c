//! Feeds arbitrary UTF-8 text to the configuration parser, with includes
//! disabled so the fuzzer never touches the filesystem.
//!
//! Checks: no panic; errors render as text; an accepted configuration
//! renders (`render_effective`) to text that parses back to the same
//! settings. The listener is compared by the addresses it binds: rendering
//! spells out the default `listen` scope that the input may have left out.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match msgc::config::parse_for_fuzz(text) {
        Ok(config) => {
            let rendered = config.render_effective();
            let again = match msgc::config::parse_for_fuzz(&rendered) {
                Ok(again) => again,
                Err(e) => panic!("rendered config does not parse: {e}\n{rendered}"),
            };
            assert_eq!(again.server, config.server, "{rendered}");
            assert_eq!(again.client, config.client, "{rendered}");
            assert_eq!(
                again.listener.effective(again.server.port),
                config.listener.effective(config.server.port),
                "{rendered}"
            );
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
