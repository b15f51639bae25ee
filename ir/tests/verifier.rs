//! The verifier accepts a well-formed graph and rejects each kind of broken one.

use griffin_ir::text::{parse, print};
use griffin_ir::{verify, Op, UnaryOp, Value, VerifyError};

const GOOD: &str = r#"graph g {
  %0: i32[T] = input.tokens "ids"
  %1: i32[] = input.position "start"
  %2: f32[3,4] = input.state "conv"
  %3: f32[16,4] = param "embed"
  %4: f32[4,1,4] = param "conv.w"
  %5: f32[4] = param "conv.b"
  %6: f32[T,4] = gather %3, %0
  %7: i32[T] = positions %1, %0
  %8: f32[T,4], %9: f32[3,4] = conv1d %6, %7, %2, %4, %5 {width=4}
  %10: f32[T,16] = linear %8, %3 {bias=false}
  %11: f32[T,16] = soft_cap %10 {cap=30.0}
  output.logits "logits" %11
  output.state "conv" %9
}
"#;

fn edit(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "fixture lacks {from:?}");
    GOOD.replacen(from, to, 1)
}

fn verify_text(text: &str) -> Result<(), VerifyError> {
    verify(&parse(text).expect("parses"))
}

#[test]
fn accepts_good_graph_and_round_trips() {
    let g = parse(GOOD).unwrap();
    verify(&g).unwrap();
    assert_eq!(print(&g), GOOD);
}

#[test]
fn rejects_declared_type_that_operands_do_not_give() {
    let err = verify_text(&edit("%10: f32[T,16] = linear", "%10: f32[T,15] = linear")).unwrap_err();
    assert!(
        matches!(err, VerifyError::ResultMismatch { ref op, .. } if op == "linear"),
        "{err}"
    );
}

#[test]
fn rejects_operand_types_the_op_does_not_accept() {
    let err = verify_text(&edit("%4: f32[4,1,4] = param", "%4: f32[4,1,3] = param")).unwrap_err();
    assert!(
        matches!(err, VerifyError::Type { ref op, .. } if op == "conv1d"),
        "{err}"
    );
}

#[test]
fn rejects_wrong_operand_count() {
    let err = verify_text(&edit(
        "linear %8, %3 {bias=false}",
        "linear %8 {bias=false}",
    ))
    .unwrap_err();
    assert!(
        matches!(err, VerifyError::Arity { expected: 2, .. }),
        "{err}"
    );
    let err = verify_text(&edit(
        "linear %8, %3 {bias=false}",
        "linear %8, %3, %5 {bias=false}",
    ))
    .unwrap_err();
    assert!(
        matches!(err, VerifyError::Arity { expected: 2, .. }),
        "{err}"
    );
}

#[test]
fn rejects_dangling_edge() {
    let mut g = parse(GOOD).unwrap();
    let gather = g
        .node_ids()
        .find(|id| g.node(*id).op == Op::Gather { scale: None })
        .unwrap();
    let out = g
        .node_ids()
        .find(|id| matches!(g.node(*id).op, Op::Output { .. }))
        .unwrap();
    g.add_raw_edge(
        Value {
            node: gather,
            output: 3,
        },
        out,
        1,
    );
    let err = verify(&g).unwrap_err();
    assert!(
        matches!(err, VerifyError::DanglingEdge { output: 3, .. }),
        "{err}"
    );
}

#[test]
fn rejects_cycle() {
    let text = r#"graph g {
  %0: f32[4] = param "x"
  %1: f32[4] = neg %0
  %2: f32[4] = exp %1
  output.logits "logits" %2
}
"#;
    let mut g = parse(text).unwrap();
    verify(&g).unwrap();
    let find = |g: &griffin_ir::Graph, u: UnaryOp| {
        g.node_ids()
            .find(|id| g.node(*id).op == Op::Unary(u))
            .unwrap()
    };
    let (neg, exp) = (find(&g, UnaryOp::Neg), find(&g, UnaryOp::Exp));
    let param = g.operands(neg)[0];
    g.replace_all_uses(
        param,
        Value {
            node: exp,
            output: 0,
        },
    );
    let err = verify(&g).unwrap_err();
    assert!(matches!(err, VerifyError::Cycle { .. }), "{err}");
}

#[test]
fn rejects_state_input_without_output() {
    let err = verify_text(&edit("  output.state \"conv\" %9\n", "")).unwrap_err();
    assert_eq!(
        err,
        VerifyError::UnpairedStateInput {
            name: "conv".into()
        }
    );
}

#[test]
fn rejects_state_output_without_input() {
    let err = verify_text(&edit(
        "output.state \"conv\" %9",
        "output.state \"conv\" %9\n  output.state \"other\" %9",
    ))
    .unwrap_err();
    assert_eq!(
        err,
        VerifyError::UnpairedStateOutput {
            name: "other".into()
        }
    );
}

#[test]
fn rejects_state_written_with_another_type() {
    let err = verify_text(&edit(
        "output.state \"conv\" %9",
        "output.state \"conv\" %8",
    ))
    .unwrap_err();
    assert!(
        matches!(err, VerifyError::StateTypeMismatch { .. }),
        "{err}"
    );
}

#[test]
fn rejects_duplicate_names() {
    let err = verify_text(&edit("input.position \"start\"", "input.position \"ids\"")).unwrap_err();
    assert_eq!(
        err,
        VerifyError::DuplicateName {
            kind: "input",
            name: "ids".into()
        }
    );
}

#[test]
fn rejects_one_param_with_two_types() {
    let err = verify_text(&edit("param \"conv.b\"", "param \"conv.w\"")).unwrap_err();
    assert!(
        matches!(err, VerifyError::ParamTypeMismatch { .. }),
        "{err}"
    );
}

#[test]
fn parser_reports_line_of_error() {
    let err = parse(&edit("= gather %3, %0", "= gather %3, %99")).unwrap_err();
    assert_eq!(err.line, 8);
    assert!(err.message.contains("%99"));
    assert!(parse(&edit("= gather", "= frobnicate"))
        .unwrap_err()
        .message
        .contains("unknown op"));
    assert!(parse("graph g {\n")
        .unwrap_err()
        .message
        .contains("closing"));
}
