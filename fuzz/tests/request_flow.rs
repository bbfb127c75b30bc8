//! Sequences the `request_flow` fuzz target found, replayed through its harness
//! (fuzz/src/request_flow.rs) with every invariant it checks. `make fuzz-regressions`
//! runs them (plain `cargo test`, no libFuzzer).

use fuzz_support::request_flow::{run, Answer, Input, Op};

/// Config 0: authorize mode, failure mode closed; `/v1/thing` costs 3.
const CLOSED: u8 = 0;
const PAID: u8 = 3; // PATHS[3] = "/v1/thing"
const FREE: u8 = 0; // PATHS[0] = "/free": no call, so the in-flight list stays short

fn start(path: u8, request_id: bool) -> Op {
    Op::Start {
        path,
        key: 0,
        post: true,
        request_id,
        end_of_stream: true,
    }
}

/// The sequence that failed after ~2.1M executions ("request req-1 charged 3, never
/// forwarded, not refunded"): the authorize answer of req-1 is lost after the service
/// charged it, the gate answers 503 and queues an undo refund, and the service answers that
/// refund `refund_answer`. Free requests in between only shift the stream numbers.
fn lost_then_refund_answered(refund_answer: Answer) -> Input {
    Input {
        config: CLOSED,
        ops: vec![
            start(PAID, true), // stream 0, req-1: authorize call in flight
            start(FREE, false),
            Op::Log { stream: 1 },
            Op::Tick,
            start(FREE, false),
            // The only call in flight is req-1's authorize: charged, answer lost.
            Op::Answer {
                call: 9,
                answer: Answer::Lost { processed: true },
            },
            start(FREE, true),
            Op::Tick, // the outbox sends the undo refund of req-1
            Op::Answer {
                call: 99,
                answer: refund_answer,
            },
            start(FREE, false),
        ],
    }
}

/// A refund refused with a final 4xx (here 402, the deny shape) is given up at once, as the
/// contract says (docs/balance-service.md 3.3), and counted in `farebox_refund_failures`:
/// the model used to expect a refund or seven failed attempts, and reported a loss.
#[test]
fn undo_refused_with_a_final_4xx_is_counted_not_lost() {
    run(&lost_then_refund_answered(Answer::Deny {
        recall: false,
        retry_after_ms: 0,
    }));
}

/// A service answering 404 to a refund of a charge it made breaks the contract; the model
/// refuses the refund instead (409), which the filter counts as a failure.
#[test]
fn undo_answered_404_by_a_service_that_charged_is_refused_instead() {
    run(&lost_then_refund_answered(Answer::Status(404)));
}

/// Retryable answers (5xx, 408, 429, no answer, a redirect) keep the refund queued: the
/// drain at the end gets it refunded, and every failed attempt is counted.
#[test]
fn undo_answered_retryably_is_refunded_later() {
    for answer in [
        Answer::Status(503),
        Answer::Status(408),
        Answer::Status(429),
        Answer::Status(302),
        Answer::Lost { processed: false },
    ] {
        run(&lost_then_refund_answered(answer));
    }
}

/// The undo refund succeeds at once.
#[test]
fn undo_refunded() {
    run(&lost_then_refund_answered(Answer::Status(200)));
}
