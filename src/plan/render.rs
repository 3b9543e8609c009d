//! Rendering a plan for people (text, markdown for pull-request comments)
//! and for programs (JSON). Rendering never changes a plan.

use std::fmt::Write as _;

use super::{Action, Change, Plan, Summary};

/// The symbol Terraform users expect for each action.
pub fn symbol(action: Action) -> &'static str {
    match action {
        Action::Create => "+",
        Action::Update => "~",
        Action::Replace => "-/+",
        Action::Delete => "-",
        Action::NoOp => " ",
    }
}

/// `Plan: 1 to create, 0 to update, 0 to replace, 0 to delete.`
pub fn summary_line(s: &Summary) -> String {
    format!(
        "Plan: {} to create, {} to update, {} to replace, {} to delete.",
        s.create, s.update, s.replace, s.delete
    )
}

fn cost_line(plan: &Plan) -> Option<String> {
    let total: f64 = plan
        .changes
        .iter()
        .filter(|c| c.action != super::Action::Delete)
        .map(|c| c.hourly_cost_after)
        .sum();
    (total > 0.0).then(|| format!("Cost after apply: ${total:.2}/hour."))
}

fn heading(plan: &Plan) -> String {
    let mode = if plan.destroy {
        " (destroy)"
    } else if plan.refresh_only {
        " (refresh-only: drift only)"
    } else {
        ""
    };
    format!(
        "motorpool plan for project `{}`{mode}: {} provider, {} instances observed in {} list call{}",
        plan.project,
        plan.provider.kind(),
        plan.observed_instances,
        plan.observed_pages,
        if plan.observed_pages == 1 { "" } else { "s" }
    )
}

/// The default, human text.
pub fn text(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}\n", heading(plan));
    if !plan.has_changes() {
        notes(&mut out, plan);
        let _ = writeln!(
            out,
            "No changes. {} matches the spec.",
            if plan.refresh_only {
                "Nothing drifted: the project"
            } else {
                "The project"
            }
        );
        return out;
    }
    for c in plan.actionable() {
        text_change(&mut out, c);
    }
    notes(&mut out, plan);
    let _ = writeln!(out, "{}", summary_line(&plan.summary));
    if let Some(cost) = cost_line(plan) {
        let _ = writeln!(out, "{cost}");
    }
    out
}

/// What needs no change but is worth knowing: pools warming, clusters stopped on purpose.
fn notes(out: &mut String, plan: &Plan) {
    let mut any = false;
    for c in plan.changes.iter().filter(|c| c.action == Action::NoOp) {
        for r in &c.reasons {
            let _ = writeln!(out, "  = {}: {r}", c.address);
            any = true;
        }
    }
    if any {
        let _ = writeln!(out);
    }
}

fn text_change(out: &mut String, c: &Change) {
    let drift = if c.drift { "  [drift]" } else { "" };
    let _ = writeln!(
        out,
        "{:>3} {} ({}){drift}",
        symbol(c.action),
        c.address,
        c.action.as_str()
    );
    for r in &c.reasons {
        let _ = writeln!(out, "      {r}");
    }
    for op in &c.ops {
        let _ = writeln!(out, "      > {}", op.describe());
        for line in op_details(op) {
            let _ = writeln!(out, "          {line}");
        }
    }
    if !c.depends_on.is_empty() {
        let _ = writeln!(out, "      after: {}", c.depends_on.join(", "));
    }
    let _ = writeln!(out);
}

/// What an op's nodes start from that a reviewer must see: each mount (a
/// path of this machine, or a bucket, made visible inside every node).
fn op_details(op: &super::Op) -> Vec<String> {
    let super::Op::Bootstrap { spec } = op else {
        return Vec::new();
    };
    spec.mounts
        .iter()
        .map(|m| {
            let access = if m.read_only {
                "read-only"
            } else {
                "read-write"
            };
            format!("mount {:?} at {:?} ({access})", m.source, m.target)
        })
        .collect()
}

/// `--output json`.
pub fn json(plan: &Plan) -> String {
    // A Plan is plain data: serializing it cannot fail.
    serde_json::to_string_pretty(plan).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// `--output markdown`, for a pull-request comment.
pub fn markdown(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### motorpool plan: `{}`\n", plan.project);
    if !plan.has_changes() {
        let _ = writeln!(out, "No changes: the project matches the spec.");
        return out;
    }
    let _ = writeln!(out, "**{}**", summary_line(&plan.summary));
    if let Some(cost) = cost_line(plan) {
        let _ = writeln!(out, "{cost}");
    }
    let _ = writeln!(out, "\n| | resource | action | why |\n|---|---|---|---|");
    for c in plan.actionable() {
        let why = c.reasons.join("<br>").replace('|', "\\|");
        let flag = if c.drift { " :warning: drift" } else { "" };
        let _ = writeln!(
            out,
            "| `{}` | `{}` | {}{flag} | {why} |",
            symbol(c.action).trim(),
            c.address,
            c.action.as_str()
        );
    }
    let _ = writeln!(out, "\n<details><summary>Operations</summary>\n\n```");
    for c in plan.actionable() {
        for op in &c.ops {
            let _ = writeln!(out, "{}: {}", c.address, op.describe());
            for line in op_details(op) {
                let _ = writeln!(out, "{}:     {line}", c.address);
            }
        }
    }
    let _ = writeln!(out, "```\n</details>");
    out
}
