//! Fuzzes the control socket's server side: the input is what a hostile
//! client writes (raw bytes, delivered in pieces of a fuzzed size), split
//! into messages by the server's own splitter and answered by its own
//! session (see `devmodel::control::fuzzing` for what is left out).
//! The first byte picks the piece size; when the second byte is odd the
//! harness writes the negotiation first, so the commands are reached
//! without the fuzzer having to find `qmp_capabilities` itself.
#![no_main]

use devmodel::control::fuzzing::FuzzControl;
use hcd_emul_fuzz::run_small_stack;
use libfuzzer_sys::fuzz_target;

fn body(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    let ctl = FuzzControl::new();
    let mut input = Vec::with_capacity(rest.len() + 40);
    if rest.first().is_some_and(|b| b & 1 == 1) {
        input.extend_from_slice(b"{\"execute\":\"qmp_capabilities\"}\r\n");
    }
    input.extend_from_slice(rest);
    std::hint::black_box(ctl.run(&input, chunk));
}

fuzz_target!(|data: &[u8]| run_small_stack(data, body));
