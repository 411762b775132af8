"""Named SQL queries kept in sql/*.sql files (installed as the package kdflow.sql).

A file holds many queries, each introduced by a `-- name: some_query` line; parameters are DuckDB's
`$name` placeholders, so values are never formatted into SQL text. Bulk inputs are Arrow tables that the
store registers under the relation name the query reads (`incoming` by convention).
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

SQL_PACKAGE = "kdflow.sql"  # the repository's sql/ folder, wherever kdflow is installed (pyproject package-dir)
_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$")


class SqlFileError(ValueError):
    """A malformed .sql file: names the file and line."""


def parse_sql(text: str, origin: str) -> dict[str, str]:
    """Split one file's text into {query name: SQL}."""
    queries: dict[str, str] = {}
    name: str | None = None
    body: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        match = _NAME.match(line.strip())
        if match:
            if name is not None:
                queries[name] = "\n".join(body).strip()
            name, body = match.group(1), []
            if name in queries:
                raise SqlFileError(f"{origin}:{lineno}: query {name!r} is defined twice")
            continue
        if line.strip().startswith("-- name"):
            raise SqlFileError(f"{origin}:{lineno}: bad query header {line.strip()!r} (use '-- name: lower_snake')")
        if name is None:
            if line.strip() and not line.strip().startswith("--"):
                raise SqlFileError(f"{origin}:{lineno}: SQL before the first '-- name:' header")
            continue
        body.append(line)
    if name is not None:
        queries[name] = "\n".join(body).strip()
    for qname, sql in queries.items():
        if not sql:
            raise SqlFileError(f"{origin}: query {qname!r} is empty")
    return queries


@cache
def queries() -> dict[str, str]:
    """All named queries of the shipped .sql files; a name used in two files is an error."""
    found: dict[str, str] = {}
    where: dict[str, str] = {}
    shipped = (path for path in files(SQL_PACKAGE).iterdir() if path.name.endswith(".sql"))
    for path in sorted(shipped, key=lambda path: path.name):
        for name, sql in parse_sql(path.read_text(encoding="utf-8"), str(path)).items():
            if name in found:
                raise SqlFileError(f"query {name!r} is defined in both {where[name]} and {path.name}")
            found[name], where[name] = sql, path.name
    return found


def sql(name: str) -> str:
    try:
        return queries()[name]
    except KeyError:
        raise SqlFileError(f"no query named {name!r} in {files(SQL_PACKAGE)}") from None
