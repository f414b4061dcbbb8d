"""The one ``<style>`` block of the report pages."""

from __future__ import annotations



CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#f3f5f8;--card:#fff;--accent:#0969da}
*{box-sizing:border-box}
body{margin:0;font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);background:var(--bg)}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;font-size:.9em}
.wrap{max-width:1080px;margin:0 auto;padding:0 24px}
header{background:#1f2633;color:#fff;padding:26px 0 22px}
header h1{margin:0;font-size:24px;font-weight:650;letter-spacing:-.01em}
header h1 span{color:#9fb3c8;font-weight:400}
dl.meta{display:grid;grid-template-columns:max-content 1fr max-content 1fr;gap:3px 18px;margin:14px 0 0;font-size:13px}
dl.meta dt{color:#9fb3c8}dl.meta dd{margin:0;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}
.ok{color:#3fb950}.bad{color:#ff7b72}
nav{margin-top:14px;font-size:13px}nav a{color:#c9d8ea;margin-right:16px;text-decoration:none;border-bottom:1px dotted #7d8fa5}
section.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:20px 26px 22px;margin:20px 0;box-shadow:0 1px 2px #1f232808}
h2{font-size:19px;margin:0 0 4px}h3{font-size:15px;margin:20px 0 6px}
p.explain{color:var(--muted);margin:0 0 14px;max-width:86ch}
p.caption{color:var(--muted);font-size:13px;margin:4px 0 12px}
p.note,p.warn{border-radius:6px;padding:8px 12px;margin:8px 0;font-size:14px}
p.note{background:#ddf4ff;border:1px solid #54aeff66}
p.warn{background:#fff8c5;border:1px solid #d4a72c66}
.table-wrap{overflow-x:auto}
table.data{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums;margin:6px 0 4px}
table.data th{font-weight:600;color:var(--muted);text-align:right;padding:4px 12px;border-bottom:2px solid var(--line)}
table.data td{text-align:right;padding:3px 12px;border-bottom:1px solid #eaeef2}
table.data th:first-child,table.data td:first-child{text-align:left}
table.data tr.best td{background:#e6f4ea;font-weight:600}
svg.chart{width:100%;max-width:780px;height:auto;display:block;margin:6px 0 2px;font-family:inherit}
svg .grid line{stroke:#edf0f3;stroke-width:1}
svg .axis text{font-size:11px;fill:#59636e}
svg .axis text.label{font-size:12px;fill:#1f2328}
svg .frame{fill:none;stroke:#aab4bf}
svg .chance{stroke:#9aa4ae;stroke-dasharray:4 4;stroke-width:1}
svg .errorbar line{stroke-width:1.6}
svg .point{stroke:#fff;stroke-width:1}
svg path.series{fill:none;stroke-width:2;stroke-linejoin:round;opacity:.9}
svg .legend text{font-size:12px;fill:#1f2328}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:8px 28px}
@media (max-width:1000px){.grid2{grid-template-columns:1fr}}
.heat-legend{display:flex;align-items:center;gap:8px;font-size:13px;color:var(--muted);margin:6px 0 14px;flex-wrap:wrap}
.colorbar{display:inline-block;width:180px;height:12px;border-radius:3px;border:1px solid var(--line)}
.heat-legend .num{font-variant-numeric:tabular-nums}
.doc{margin:0 0 16px}
.doc-head{display:flex;align-items:baseline;gap:10px;font-size:13px;margin-bottom:5px;flex-wrap:wrap}
.badge{font-size:11px;font-weight:600;text-transform:uppercase;letter-spacing:.04em;padding:2px 8px;border-radius:10px}
.badge.clean{background:#ddf4ff;color:#0550ae}.badge.needle{background:#ffebe9;color:#a40e26}
.muted{color:var(--muted)}
.heatmap{font-size:14px;line-height:1.95;white-space:pre-wrap;overflow-wrap:anywhere;border:1px solid var(--line);
 border-radius:8px;padding:10px 14px;background:#fff;max-height:340px;overflow-y:auto}
.tok{border-radius:3px;padding:1px 1px}
.tok.needle{outline:2px solid #1f2328;outline-offset:-1px}
.tok.sample{background:#f7f7f7;color:var(--fg);padding:1px 6px}
footer{color:var(--muted);font-size:12px;padding:8px 0 40px}
table.matrix td{text-align:center;min-width:92px;border:2px solid #fff}
table.matrix td:first-child{text-align:left}
table.matrix td.missing{color:var(--muted);background:#f6f8fa}
table.matrix td.stale{font-style:italic}
table.data td{white-space:nowrap}
table.data td.name{white-space:normal;min-width:9em;text-align:left}
table#runs th{text-align:left}
table.errors th:last-child{text-align:left}
table.errors td.context{white-space:normal;text-align:left;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
mark.tokerr{background:#ffd8a8;font-weight:700;padding:0 1px;border-radius:2px}
ul.verdict{margin:6px 0 4px;padding-left:20px}
table.data td.path{white-space:normal;word-break:break-all;min-width:14em;text-align:left;
 font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
"""
