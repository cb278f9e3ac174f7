"""The backend part's sorting of perf samples into phases (bench/backend_profile.py)."""

from __future__ import annotations

from bench.backend_profile import ORDER, OTHER, PLPGSQL, READING, classify, parse_samples

# Leaf first, as perf script prints a sample's stack.
STATEMENT_IN_FUNCTION = ["_bt_compare", "IndexNext", "ExecScan", "standard_ExecutorRun", "_SPI_execute_plan",
                         "exec_stmt_execsql", "plpgsql_exec_function", "plpgsql_call_handler", "ExecInterpExpr",
                         "ExecResult", "standard_ExecutorRun", "PortalRun", "PostgresMain"]
FUNCTION_GLUE = ["pushJsonbValueScalar", "jsonb_build_object", "ExecInterpExpr", "exec_eval_expr",
                 "plpgsql_exec_function", "plpgsql_call_handler", "ExecInterpExpr", "exec_assign_expr",
                 "_SPI_execute_plan", "exec_stmt_execsql", "plpgsql_call_handler", "PostgresMain"]


def test_a_sample_counts_in_the_first_phase_that_matches() -> None:
    assert classify(["fdatasync", "XLogFlush", "CommitTransaction", "PostgresMain"]) == "commit"
    # a CHECK constraint inside an update inside a function: the constraint, not the statement
    assert classify(["pg_strtok", "stringToNode", "ExecConstraints", *STATEMENT_IN_FUNCTION]) == "CHECK constraints"
    assert classify(["ExecInitNode", "standard_ExecutorStart", *STATEMENT_IN_FUNCTION[4:]]) == "executor start"
    assert classify(["base_yyparse", "raw_parser", "pg_parse_query", "PostgresMain"]) == "parse and plan"


def test_inside_a_function_the_innermost_frame_decides_statement_or_glue() -> None:
    assert classify(STATEMENT_IN_FUNCTION) == READING
    # a nested function's own code, called from a statement of its caller: glue, not reading
    assert classify(FUNCTION_GLUE) == PLPGSQL
    assert classify(["__send", "pq_flush", "PostgresMain"]) == OTHER
    assert set(ORDER) >= {READING, PLPGSQL, OTHER, "commit", "index writes", "row writes"}


def test_only_the_named_processes_samples_are_kept() -> None:
    script = [
        "postgres 101 \n", "\t  4e4609 ExecScan+0x12\n", "\t  5f460a PostgresMain\n", "\n",
        "python 7 \n", "\t  1 PyEval\n", "\n",
        "postgres 202 \n", "\t  2 CommitTransaction\n", "\n",
        "postgres 101 \n", "\t  3 [unknown]\n",
    ]
    assert list(parse_samples(script, {101})) == [["ExecScan", "PostgresMain"], ["[unknown]"]]
