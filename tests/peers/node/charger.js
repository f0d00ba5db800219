// An independent OCPP 1.6J charger for the agent's tests, built on the npm package
// ocpp-rpc (not on the Python ocpp package the other peers use), in strict mode: every
// answer the agent gives is validated against ocpp-rpc's own copy of the OCPP schemas.
//
// usage: node charger.js <endpoint> <identity> <idTag>
// Runs one charging session (boot, status, authorize, start, two meter values, stop),
// answers GetConfiguration if the central system asks, prints one JSON line with what
// it got back, and exits 0 on success, 1 on any error.
'use strict';

const { RPCClient } = require('ocpp-rpc');

async function main() {
    const [endpoint, identity, idTag] = process.argv.slice(2);
    const client = new RPCClient({
        endpoint,
        identity,
        protocols: ['ocpp1.6'],
        strictMode: true,
        callTimeoutMs: 15000,
        reconnect: false,
    });
    const received = [];
    client.handle(({ method, params }) => {
        received.push(method);
        if (method === 'GetConfiguration') {
            return { configurationKey: [{ key: 'MeterValueSampleInterval', readonly: false, value: '10' }] };
        }
        return {};
    });
    await client.connect();
    const now = () => new Date().toISOString();
    const boot = await client.call('BootNotification', {
        chargePointVendor: 'ocpp-rpc',
        chargePointModel: 'NodeCharger',
        firmwareVersion: '2.2.1',
    });
    await client.call('StatusNotification', { connectorId: 1, errorCode: 'NoError', status: 'Preparing' });
    const auth = await client.call('Authorize', { idTag });
    const start = await client.call('StartTransaction', {
        connectorId: 1, idTag, meterStart: 5000, timestamp: now(),
    });
    const tx = start.transactionId;
    for (const step of [1, 2]) {
        await client.call('MeterValues', {
            connectorId: 1,
            transactionId: tx,
            meterValue: [{
                timestamp: now(),
                sampledValue: [
                    { value: String(5000 + step * 250), measurand: 'Energy.Active.Import.Register', unit: 'Wh' },
                    { value: '11.2', measurand: 'Power.Active.Import', unit: 'kW' },
                ],
            }],
        });
    }
    const stop = await client.call('StopTransaction', {
        transactionId: tx, meterStop: 5600, timestamp: now(), idTag, reason: 'Local',
    });
    const heartbeat = await client.call('Heartbeat', {});
    await client.close();
    console.log(JSON.stringify({ ok: true, boot, auth, start, stop, heartbeat, received }));
}

main().catch((err) => {
    console.log(JSON.stringify({ ok: false, error: String(err && err.stack || err) }));
    process.exit(1);
});
