"""RabbitMQ for the workers, the relay and the CLI (the shim's asyncio channel is :mod:`worker.shim.amqp`).

- :mod:`worker.rabbit.connection`: the blocking connection a consumer polls and small publishers use;
- :mod:`worker.rabbit.publisher`: the relay's pipelined confirmed publisher;
- :mod:`worker.rabbit.topology`: declaring and checking the contract's exchanges and queues;
- :mod:`worker.rabbit.dead_letters`: the dead-letter queue held for an operator;
- :mod:`worker.rabbit.users`: the service's two broker users.

No module outside this package (and the shim's channel) imports pika.
"""
