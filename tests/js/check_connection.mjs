// Runs static/connection.js's checkConnection in Node against a server (or a proxy in
// front of it) and prints the result as one line of JSON: what tests/test_diagnostic.py
// checks through nginx. Usage: node check_connection.mjs <origin> [idle seconds]
import { checkConnection } from "../../static/connection.js";

const [base, idle] = process.argv.slice(2);
const result = await checkConnection({ base, idleS: idle === undefined ? undefined : Number(idle) });
process.stdout.write(`${JSON.stringify(result)}\n`);
