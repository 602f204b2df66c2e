"""``python -m luna.diagnose``: the command, and the reports it writes.

The pipeline itself (segment, group, classify, verdict) is `luna.inference`; this
package is the user-facing side: `luna.diagnose.__main__` (options, one CT or the
validation series), `luna.diagnose.report` (table, report.json, nodules.csv) and
`luna.diagnose.pictures` (PNGs).
"""
