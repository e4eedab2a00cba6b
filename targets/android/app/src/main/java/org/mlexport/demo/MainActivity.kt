package org.mlexport.demo

import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.ScrollView
import android.widget.TextView
import androidx.appcompat.app.AppCompatActivity
import androidx.lifecycle.lifecycleScope
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext
import org.json.JSONObject
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule
import java.io.File

/** One chat screen: the bundled .pte through ExecuTorch's LlmModule, tokens streamed, tok/s shown. */
class MainActivity : AppCompatActivity() {
    private lateinit var status: TextView
    private lateinit var transcript: TextView
    private lateinit var stats: TextView
    private lateinit var prompt: EditText
    private lateinit var send: Button
    private lateinit var scroll: ScrollView
    private var module: LlmModule? = null
    private var contract: BundleContract? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        status = findViewById(R.id.status)
        transcript = findViewById(R.id.transcript)
        stats = findViewById(R.id.stats)
        prompt = findViewById(R.id.prompt)
        send = findViewById(R.id.send)
        scroll = findViewById(R.id.scroll)
        send.setOnClickListener { ask(prompt.text.toString().trim()) }
        lifecycleScope.launch { load() }
    }

    private suspend fun load() {
        try {
            val (c, dir) = withContext(Dispatchers.IO) { BundleContract.install(this@MainActivity) }
            val model = File(dir, c.modelFile).path
            val tokenizer = File(dir, c.tokenizerFile).path
            val data = c.dataFiles.firstOrNull()?.let { File(dir, it).path }
            val started = System.nanoTime()
            val m = withContext(Dispatchers.IO) {
                LlmModule(model, tokenizer, 0.0f, data).also { check(it.load() == 0) { "LlmModule.load failed" } }
            }
            module = m
            contract = c
            val seconds = (System.nanoTime() - started) / 1e9
            status.text = getString(R.string.ready, c.quant, "executorch ${BuildConfig.EXECUTORCH_VERSION}, loaded in %.1f s".format(seconds))
            send.isEnabled = true
        } catch (e: Exception) {
            status.text = "Cannot load the model: ${e.message}. Rebuild the app after ./gradlew mlexportBundle."
        }
    }

    private fun ask(user: String) {
        val m = module ?: return
        val c = contract ?: return
        if (user.isEmpty()) return
        send.isEnabled = false
        prompt.text.clear()
        transcript.append("\n\nYou: $user\nModel: ")
        lifecycleScope.launch(Dispatchers.Default) {
            m.generate(
                c.prompt(user),
                c.maxContext,
                object : LlmCallback {
                    override fun onResult(result: String) {
                        runOnUiThread {
                            transcript.append(result)
                            scroll.post { scroll.fullScroll(ScrollView.FOCUS_DOWN) }
                        }
                    }

                    override fun onStats(stats: String) {
                        runOnUiThread { this@MainActivity.stats.text = describe(stats) }
                    }
                },
                false,
            )
            m.resetContext()
            withContext(Dispatchers.Main) { send.isEnabled = true }
        }
    }

    /** The runner's stats JSON (the PyTorchObserver fields) as prefill and decode tok/s. */
    private fun describe(json: String): String = try {
        val s = JSONObject(json)
        val prefillMs = s.getLong("prompt_eval_end_ms") - s.getLong("inference_start_ms")
        val decodeMs = s.getLong("inference_end_ms") - s.getLong("prompt_eval_end_ms")
        val prefill = s.getInt("prompt_tokens") * 1000.0 / maxOf(prefillMs, 1)
        val decode = s.getInt("generated_tokens") * 1000.0 / maxOf(decodeMs, 1)
        "prefill %.0f tok/s · decode %.1f tok/s · %d tokens".format(prefill, decode, s.getInt("generated_tokens"))
    } catch (e: Exception) {
        json
    }

    override fun onDestroy() {
        module?.resetNative()
        super.onDestroy()
    }
}
